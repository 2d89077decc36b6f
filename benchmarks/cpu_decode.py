"""CPU decoding against llama.cpp, the anchor for local CPU inference: `small-llama` (124.7M
parameters) at bf16, int8 and int4, batch-1 decode and 64-sequence generation (targets for
bf16 and int4; int8 is reported beside them), and bf16's 8-sequence generation (where a CPU
without AVX512-BF16 runs its steps through the dense kernel's register blocks; reported), the
tools alternating in one run, with the copy bandwidth measured in the same run.

llmkit: `llmkit bench offline` in its own process (the engine, the kernels a server runs),
batch 1: tok/s = 1 / mean time per output token; checkpoints `init --preset small-llama
--dtype bfloat16`, `quantize --method int8 --quantize-lm-head`, `quantize --method rtn
--group-size 32 --quantize-lm-head` and `quantize --method gptq --group-size 128` (builtin
calibration; gptq leaves the lm_head in bf16). llama-quantize quantizes the lm_head too, to
a type of its own choosing: the bytes each token reads are reported beside the speeds.
llama.cpp (built from the source in the llama-cpp-python sdist by `bash
benchmarks/setup_reference_venvs.sh llamacpp`, for this CPU but without its AMX matrix
products, which stopped with SIGILL on an AMX host): the bf16 checkpoint converted by
`convert_hf_to_gguf.py --outtype bf16` (told to treat the preset's tokenizer as the default
pre-tokenizer, which it does not recognise: only speed is compared), `llama-quantize` to
Q8_0 and Q4_0; `llama-bench -p 0 -n 64` (tok/s) and
`llama-batched-bench -npp 128 -ntg 64 -npl 64` (and `-npl 8`). Both on --threads threads (2).

Batch 1: prompt 16, 64 generated. 64 sequences: prompt 128, 64 generated each, compared
twice: generation (llama.cpp's S_TG, its decode steps after every prompt is processed,
against llmkit's `decode_throughput`, the steps after every request has its first token)
and the whole job (prompts and generation: llama.cpp's S against llmkit's total tokens/s,
both (64 x 128 + 64 x 64) tokens over the job's time); 8 sequences alike. MBU: the
weight bytes a token reads (all but the embedding table) x tok/s over the copy bandwidth
(bytes read + written per second copying 256 MiB, as STREAM counts them). Each cell is the
median of --rounds rounds; the spread (min-max over rounds) is printed beside it. A batch-1
ratio is the median of the rounds' own ratios, each of two runs back to back (the host's
bandwidth swings several-fold within the hour: a ratio of the medians can set one tool's
fast round against the other's slow one); the ratio of the medians is reported beside it.
So is llmkit's int4 / bf16: each round runs the two again in the order A B B A (bf16 first
in even rounds, int4 in odd ones), and its ratio is the geometric mean of the two pairs', so
a drift of the host's speed across the round cancels out instead of landing on one side.

Writes benchmarks/results/cpu_decode-<date>.json: `ratios` maps bf16, int8 and int4 (rtn
g32 against Q4_0) to llmkit / llama.cpp batch-1 tok/s (the median of the rounds' ratios).

`--isa avx2` measures both tools as an AVX2-only CPU runs them, on a CPU that has more:
llama.cpp built with GGML_NATIVE off (`setup_reference_venvs.sh llamacpp-avx2`), llmkit's
kernels compiled for -march=haswell (LLMKIT_CPU_ARCH) and torch's own kernels, oneDNN's and
MKL's held to AVX2 (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA, MKL_ENABLE_INSTRUCTIONS). The
memory system is still this host's. Its result is the variant `avx2`
(cpu_decode-avx2-<date>.json).

    bash benchmarks/setup_reference_venvs.sh llamacpp [llamacpp-avx2]
    python benchmarks/cpu_decode.py [--workdir DIR] [--rounds 3] [--threads 2] [--isa avx2]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from llamacpp import LLAMACPP, run, to_gguf
from report import row, save_result

# llmkit checkpoint -> (llama.cpp type, the row it is compared in)
MODELS = {
    "bf16": ("BF16", "bf16"),
    "int8": ("Q8_0", "int8"),
    "int4-rtn-g32": ("Q4_0", "int4"),
    "int4-gptq-g128": ("Q4_0", "int4-gptq-g128"),
}
# the 64-sequence comparison; the issue's targets are bf16's and int4's, int8's is reported
BATCHED = ("bf16", "int8", "int4-rtn-g32")
BATCHED_TARGETS = ("bf16", "int4-rtn-g32")
# 8 sequences, where the dense kernel's register blocks take bf16's steps (on CPUs without
# AVX512-BF16, or held to AVX2): reported, no target
FEW = ("bf16",)
OWN = ("bf16", "int4-rtn-g32")  # int4's batch-1 speed over bf16's: each round runs both again
# --isa: llama.cpp's build directory and the environment that holds llmkit (its kernels,
# torch's, oneDNN's and MKL's) to that instruction set
ISAS = {
    "native": ("build", {}),
    "avx2": ("build-avx2", {
        "LLMKIT_CPU_ARCH": "haswell", "ATEN_CPU_CAPABILITY": "avx2",
        "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    }),
}  # fmt: skip


@dataclass(frozen=True)
class Setup:
    """How each tool runs: its threads, llama.cpp's binaries, llmkit's environment."""

    threads: int
    isa: str

    def llamacpp(self, tool: str) -> Path:
        return LLAMACPP / ISAS[self.isa][0] / "bin" / tool

    def env(self) -> dict:
        return {**os.environ, "OMP_NUM_THREADS": str(self.threads), **ISAS[self.isa][1]}


TENSOR_BYTES = """
import json, sys
from gguf import GGUFReader
reader = GGUFReader(sys.argv[1])
print(json.dumps({t.name: int(t.n_bytes) for t in reader.tensors}))
"""


def llmkit(*args: str) -> list:
    return [sys.executable, "-m", "llmkit", *args]


def prepare(work: Path) -> dict[str, tuple[Path, Path]]:
    """{name: (llmkit checkpoint, gguf)}, made once under `work`."""
    bf16 = work / "bf16"
    if not bf16.exists():
        run(llmkit("init", str(bf16), "--preset", "small-llama", "--dtype", "bfloat16"))
    methods = {
        "int8": ["--method", "int8", "--quantize-lm-head"],
        "int4-rtn-g32": ["--method", "rtn", "--group-size", "32", "--quantize-lm-head"],
        "int4-gptq-g128": ["--method", "gptq", "--group-size", "128", "--num-samples", "32"],
    }
    for name, method in methods.items():
        if not (work / name).exists():
            run(llmkit("quantize", str(bf16), str(work / name), *method))
    ggufs = {"BF16": to_gguf(bf16, work / "bf16.gguf", "bf16")}
    for kind in ("Q8_0", "Q4_0"):
        ggufs[kind] = work / f"{kind}.gguf"
        if not ggufs[kind].exists():
            run([str(LLAMACPP / "build" / "bin" / "llama-quantize"), str(ggufs["BF16"]),
                 str(ggufs[kind]), kind])  # fmt: skip
    return {name: (work / name, ggufs[kind]) for name, (kind, _) in MODELS.items()}


def copy_bandwidth(setup: Setup) -> float:
    """Bytes read + written per second copying 256 MiB (median of 5)."""
    code = f"""
import time, torch
torch.set_num_threads({setup.threads})
src = torch.ones(2**28, dtype=torch.uint8); dst = torch.empty_like(src); dst.copy_(src)
times = []
for _ in range(5):
    start = time.perf_counter(); dst.copy_(src); times.append(time.perf_counter() - start)
print(2 * src.numel() / sorted(times)[2])
"""
    return float(run([sys.executable, "-c", code]))


def llmkit_case(model: Path, batch: int, input_len: int, setup: Setup) -> dict:
    sizes = ["--batch-sizes", str(batch), "--input-len", str(input_len), "--output-len", "64"]
    out = run(llmkit("bench", "offline", str(model), *sizes, "--json"), env=setup.env())
    return json.loads(out)["cases"][0]


def llmkit_tok_s(model: Path, setup: Setup) -> float:
    return 1000 / llmkit_case(model, 1, 16, setup)["mean_tpot_ms"]


def llmkit_batched(model: Path, setup: Setup, batch: int = 64) -> dict[str, float]:
    """`batch` sequences: generation tok/s (decode_throughput) and the whole job's tok/s."""
    case = llmkit_case(model, batch, 128, setup)
    return {"generation": case["decode_throughput"], "job": case["total_token_throughput"]}


def llamacpp_tok_s(gguf: Path, setup: Setup) -> float:
    bench = setup.llamacpp("llama-bench")
    out = run([str(bench), "-m", str(gguf), "-p", "0", "-n", "64", "-t", str(setup.threads),
               "-r", "3", "-o", "json"])  # fmt: skip
    return float(json.loads(out)[0]["avg_ts"])


def llamacpp_batched(gguf: Path, setup: Setup, batch: int = 64) -> dict[str, float]:
    """`batch` sequences: S_TG and the whole job's tok/s (S)."""
    bench = setup.llamacpp("llama-batched-bench")
    out = run([str(bench), "-m", str(gguf), "-c", str(batch * 192), "-b", "2048", "-ub", "512",
               "-npp", "128", "-ntg", "64", "-npl", str(batch), "-t", str(setup.threads),
               "--output-format", "jsonl"])  # fmt: skip
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return {"generation": float(rows[-1]["speed_tg"]), "job": float(rows[-1]["speed"])}


def bytes_per_token(model: Path, gguf: Path) -> tuple[int, int]:
    """Weight bytes one decoded token reads: every tensor but the embedding table."""
    from safetensors import safe_open

    ours = 0
    for file in model.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            names = [name for name in f.keys() if "embed_tokens" not in name]  # noqa: SIM118
            ours += sum(_nbytes(f, name) for name in names)
    out = run([str(LLAMACPP / "bin" / "python"), "-c", TENSOR_BYTES, str(gguf)])
    theirs = sum(n for name, n in json.loads(out).items() if name != "token_embd.weight")
    return ours, theirs


def _nbytes(f, name: str) -> int:
    t = f.get_slice(name)
    count = 1
    for d in t.get_shape():
        count *= d
    sizes = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I64": 8, "I32": 4, "I8": 1, "U8": 1}
    return count * sizes[t.get_dtype()]


def main() -> None:
    args = parse_args()
    setup = Setup(args.threads, args.isa)
    if not setup.llamacpp("llama-bench").exists():
        name = "llamacpp" if args.isa == "native" else f"llamacpp-{args.isa}"
        sys.exit(f"llama.cpp is not built: bash benchmarks/setup_reference_venvs.sh {name}")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="llmkit-cpu-decode-"))
    work.mkdir(parents=True, exist_ok=True)
    models = prepare(work)
    cells: dict[str, list[float]] = {}
    bandwidths = []
    for r in range(args.rounds):
        bandwidths.append(copy_bandwidth(setup))
        for name, (model, gguf) in models.items():
            pair = [
                (f"llmkit {name} b1", partial(llmkit_tok_s, model, setup)),
                (f"llama.cpp {name} b1", partial(llamacpp_tok_s, gguf, setup)),
            ]
            for batch, names in ((64, BATCHED), (8, FEW)):
                if name in names:
                    pair += [
                        (f"llmkit {name} b{batch}", partial(llmkit_batched, model, setup, batch)),
                        (f"llama.cpp {name} b{batch}",
                         partial(llamacpp_batched, gguf, setup, batch)),
                    ]  # fmt: skip
            measure_pair(pair, r, cells)
        # llmkit's int4 against its own bf16, back to back as well: A B, then B A
        own = [(f"llmkit own {name} b1", partial(llmkit_tok_s, models[name][0], setup))
               for name in OWN]  # fmt: skip
        measure_pair(own, r, cells)
        measure_pair(own, r, cells, flip=True)
    report(models, cells, statistics.median(bandwidths), bandwidths, args)


def measure_pair(pair: list, r: int, cells: dict[str, list[float]], flip: bool = False) -> None:
    """Runs round r's measurements of `pair` one right after the other, the first going
    first in even rounds and second in odd ones (the other way round with `flip`), into
    `cells`."""
    for key, measure in pair if (r + flip) % 2 == 0 else pair[::-1]:
        got = measure()
        for part, value in got.items() if isinstance(got, dict) else [(None, got)]:
            cell = key if part is None else f"{key} {part}"
            cells.setdefault(cell, []).append(value)
            print(f"round {r + 1}: {cell} {value:.1f} tok/s", flush=True)


def report(models, cells: dict, bandwidth: float, bandwidths: list, args) -> None:
    med = {k: statistics.median(v) for k, v in cells.items()}
    spread = {k: [min(v), max(v)] for k, v in cells.items()}
    rows, ratios, mbu, paired = {}, {}, {}, {}
    for name, (model, gguf) in models.items():
        ours_bytes, their_bytes = bytes_per_token(model, gguf)
        row = MODELS[name][1]
        ours, theirs = med[f"llmkit {name} b1"], med[f"llama.cpp {name} b1"]
        # each round's own ratio (its two runs back to back); the ratio is their median
        both = zip(cells[f"llmkit {name} b1"], cells[f"llama.cpp {name} b1"], strict=True)
        paired[name] = [a / b for a, b in both]
        ratios[row] = statistics.median(paired[name])
        mbu[name] = {
            "llmkit": ours_bytes * ours / bandwidth,
            "llama.cpp": their_bytes * theirs / bandwidth,
        }
        rows[name] = {
            "llmkit_tok_s": ours, "llama_cpp_tok_s": theirs, "ratio": ratios[row],
            "ratio_of_medians": ours / theirs,
            "bytes_per_token": {"llmkit": ours_bytes, "llama.cpp": their_bytes},
        }  # fmt: skip
        print(f"{name:15} batch 1: llmkit {ours:7.1f} ({_span(spread[f'llmkit {name} b1'])}) "
              f"tok/s, llama.cpp {theirs:7.1f} ({_span(spread[f'llama.cpp {name} b1'])}): "
              f"{ratios[row]:.2f}x (rounds {_span(paired[name], '.2f')}, medians "
              f"{ours / theirs:.2f}x); "
              f"MBU {mbu[name]['llmkit']:.0%} / {mbu[name]['llama.cpp']:.0%}")  # fmt: skip
    batched = {64: {}, 8: {}}
    for batch, names in ((64, BATCHED), (8, FEW)):
        for name in names:
            for part in ("generation", "job"):
                key = f"{name} b{batch} {part}"
                ours, theirs = med[f"llmkit {key}"], med[f"llama.cpp {key}"]
                batched[batch][f"{name} {part}"] = {
                    "llmkit_tok_s": ours, "llama_cpp_tok_s": theirs, "ratio": ours / theirs,
                }  # fmt: skip
                print(f"{name:15} {batch} sequences, {part:10}: llmkit {ours:6.1f} "
                      f"({_span(spread[f'llmkit {key}'])}) tok/s, llama.cpp "
                      f"{theirs:6.1f} ({_span(spread[f'llama.cpp {key}'])}) "
                      f"= {ours / theirs:.2f}x")  # fmt: skip
    own_rounds = own_ratios(*(cells[f"llmkit own {name} b1"] for name in OWN))
    own = statistics.median(own_rounds)
    every = {n: cells[f"llmkit {n} b1"] + cells[f"llmkit own {n} b1"] for n in OWN}
    of_medians = statistics.median(every["int4-rtn-g32"]) / statistics.median(every["bf16"])
    print(f"llmkit int4 / bf16 batch 1: {own:.2f}x (target >= 2.5x; rounds "
          f"{_span(own_rounds, '.2f')}; of the medians {of_medians:.2f}x); copy bandwidth "
          f"{bandwidth / 1e9:.1f} GB/s")  # fmt: skip
    fields = {
        "ratios": ratios,
        "int4_over_bf16": own,
        "int4_over_bf16_rounds": own_rounds,
        "int4_over_bf16_of_medians": of_medians,
        "batch_64": batched[64],
        "batch_8": batched[8],
        "batch_1": rows,
        "mbu": mbu,
        "copy_bandwidth_bytes_s": bandwidth,
        "copy_bandwidth_rounds": bandwidths,
        "spread": spread,
        "round_ratios": paired,
        "own": {f"llmkit own {name} b1": cells[f"llmkit own {name} b1"] for name in OWN},
        "rounds": args.rounds,
    }
    summary = summarize(fields)
    variant = "" if args.isa == "native" else args.isa
    machine = f"{args.threads} threads" + (f", both tools held to {args.isa}" if variant else "")
    save_result("cpu_decode", fields, machine, anchor="llama.cpp", summary=summary, variant=variant)


def own_ratios(bf16: list[float], int4: list[float]) -> list[float]:
    """Each round's int4 / bf16: the geometric mean of its two pairs' ratios (A B B A)."""
    pairs = [b / a for a, b in zip(bf16, int4, strict=True)]
    return [math.sqrt(x * y) for x, y in zip(pairs[::2], pairs[1::2], strict=True)]


def summarize(fields: dict) -> list[dict]:
    """RESULTS.md's rows: batch 1 at each precision, llmkit's own int4 / bf16, 64 sequences,
    and 8 (runs before the 8-sequence rows have none)."""
    spread, mbu = fields["spread"], fields["mbu"]
    rows = []
    for name, cell in fields["batch_1"].items():
        ours, theirs = cell["llmkit_tok_s"], cell["llama_cpp_tok_s"]
        target = name != "int4-gptq-g128"  # its Q4_0 anchor is another method
        rounds = fields["round_ratios"][name]
        ratio = cell["ratio"]
        rows.append(row(
            f"batch 1, {name} against {MODELS[name][0]} (MBU llmkit / llama.cpp "
            f"{mbu[name]['llmkit']:.0%} / {mbu[name]['llama.cpp']:.0%}; ratio: median of the "
            f"rounds', {_span(rounds, '.2f')}; of the medians {cell['ratio_of_medians']:.2f})",
            f"{ours:.1f} tok/s ({_span(spread[f'llmkit {name} b1'])})",
            f"{theirs:.1f} ({_span(spread[f'llama.cpp {name} b1'])})",
            ratio, "≥ 1.0×" if target else "", ratio >= 1.0 if target else None,
        ))  # fmt: skip
    own = fields["int4_over_bf16"]
    bf16, int4 = (fields["own"][f"llmkit own {name} b1"] for name in OWN)
    rounds, of_medians = fields["int4_over_bf16_rounds"], fields["int4_over_bf16_of_medians"]
    rows.append(row(
        "batch 1, llmkit int4 RTN g32 against llmkit bf16, back to back, A B B A (the anchor "
        f"column: llmkit bf16; ratio: median of the rounds', {_span(rounds, '.2f')}; of the "
        f"medians of all their batch-1 runs {of_medians:.2f})",
        f"{statistics.median(int4):.1f} tok/s ({_span(int4)})",
        f"{statistics.median(bf16):.1f} ({_span(bf16)})", own, "≥ 2.5×", own >= 2.5,
    ))  # fmt: skip
    for batch in (64, 8):
        for key, cell in fields.get(f"batch_{batch}", {}).items():
            name, part = key.rsplit(" ", 1)
            measured = "generation (S_TG)" if part == "generation" else "whole job (S)"
            ratio = cell["ratio"]
            target = batch == 64 and part == "generation" and name in BATCHED_TARGETS
            cells = f"{name} b{batch} {part}"
            rows.append(row(
                f"{batch} sequences, {name}, {measured}",
                f"{cell['llmkit_tok_s']:.1f} tok/s ({_span(spread[f'llmkit {cells}'])})",
                f"{cell['llama_cpp_tok_s']:.1f} ({_span(spread[f'llama.cpp {cells}'])})",
                ratio, "≥ 1.0×" if target else "", ratio >= 1.0 if target else None,
            ))  # fmt: skip
    return rows


def _span(values: list[float], fmt: str = ".1f") -> str:
    """min-max of `values` (a spread's [min, max] itself, or every round's value)."""
    return f"{min(values):{fmt}}-{max(values):{fmt}}"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", help="keep the checkpoints and GGUF files here")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--isa", choices=tuple(ISAS), default="native",
        help="avx2: both tools as an AVX2-only CPU runs them (see above)",
    )  # fmt: skip
    return parser.parse_args()


if __name__ == "__main__":
    started = time.perf_counter()
    main()
    print(f"{time.perf_counter() - started:.0f} s")
