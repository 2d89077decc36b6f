"""LoRA adapters' cost: a batch mixing 4 adapters against the base model alone, in one run.

Model: the small-llama preset in bfloat16 (made under --workdir once), 2 threads. Four PEFT
adapters (rank 16, alpha 32, on all seven projections of every layer: the heaviest adapter
`--max-lora-rank 16` allows) are written under --workdir with random factors. Each round
runs 64 requests at once (a short prompt each, 64 tokens generated greedily with EOS
ignored, so every run generates the same number of tokens) three ways, in an order that
alternates between rounds:

- base: an engine without LoRA (`max_loras` 0), what a user serving only the base gets;
- mixed: an engine with `max_loras` 4, request i on adapter i % 4 (every step's batch holds
  all four adapters and the scheduler groups each adapter's rows);
- base on the LoRA engine: the same engine, no request naming an adapter (what serving
  adapters costs the base model's requests).

Reported: output tok/s of each and mixed / base (target >= 0.8x; median of the rounds and
the spread). Writes benchmarks/results/lora-<date>.json.

    python benchmarks/lora.py [--workdir DIR] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from report import print_median_ratio, row, save_result

THREADS = 2
CONCURRENCY = 64
OUTPUT_LEN = 64
ADAPTERS = 4
RANK = 16
TARGETS = {
    "self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
}


def make_model(work: Path) -> Path:
    from llmkit.checkpoint.init import init_checkpoint

    model = work / "small-llama-bf16"
    if not (model / "config.json").is_file():
        init_checkpoint(model, "small-llama", 0, "bfloat16", True)
    return model


def make_adapter(model: Path, directory: Path, seed: int) -> Path:
    """A PEFT adapter directory for `model` with random rank-16 factors on every projection."""
    import torch
    from safetensors.torch import save_file

    if (directory / "adapter_model.safetensors").is_file():
        return directory
    config = json.loads((model / "config.json").read_text())
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    kv = config.get("num_key_value_heads", config["num_attention_heads"]) * head_dim
    shapes = {  # (out, in)
        "q_proj": (config["num_attention_heads"] * head_dim, hidden),
        "k_proj": (kv, hidden),
        "v_proj": (kv, hidden),
        "o_proj": (hidden, config["num_attention_heads"] * head_dim),
        "gate_proj": (inter, hidden),
        "up_proj": (inter, hidden),
        "down_proj": (hidden, inter),
    }
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for block, names in TARGETS.items():
            for name in names:
                out, inp = shapes[name]
                key = f"base_model.model.model.layers.{layer}.{block}.{name}"
                a = torch.randn(RANK, inp, generator=gen) / inp**0.5
                tensors[f"{key}.lora_A.weight"] = a.to(torch.bfloat16)
                b = torch.randn(out, RANK, generator=gen) * 0.02
                tensors[f"{key}.lora_B.weight"] = b.to(torch.bfloat16)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, directory / "adapter_model.safetensors")
    peft_config = {
        "peft_type": "LORA",
        "r": RANK,
        "lora_alpha": 2 * RANK,
        "target_modules": [n for names in TARGETS.values() for n in names],
        "bias": "none",
    }
    (directory / "adapter_config.json").write_text(json.dumps(peft_config))
    return directory


def run(llm, prompts: list[str], loras: list[str | None]) -> dict:
    from llmkit.runtime.sequence import SamplingParams

    params = SamplingParams(max_tokens=OUTPUT_LEN, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, loras=loras)
    seconds = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    assert tokens == OUTPUT_LEN * len(prompts)
    return {"seconds": seconds, "tokens": tokens, "tok_s": tokens / seconds}


def main() -> None:
    args = parse_args()
    from llmkit.runtime.engine import LLM, EngineConfig

    work = Path(args.workdir or tempfile.mkdtemp(prefix="llmkit-lora-"))
    work.mkdir(parents=True, exist_ok=True)
    model = make_model(work)
    names = [f"adapter{i}" for i in range(ADAPTERS)]
    paths = [make_adapter(model, work / name, seed=i) for i, name in enumerate(names)]
    config = dict(threads=THREADS, max_num_seqs=CONCURRENCY)
    base_llm = LLM(model, EngineConfig(**config))
    lora_llm = LLM(model, EngineConfig(**config, max_loras=ADAPTERS, max_lora_rank=RANK))
    for name, path in zip(names, paths, strict=True):
        lora_llm.engine.add_lora(name, str(path))
    prompts = [f"Story {i}: once upon a time in the castle" for i in range(CONCURRENCY)]
    mixed_loras = [names[i % ADAPTERS] for i in range(CONCURRENCY)]
    runs = {
        "base": lambda: run(base_llm, prompts, [None] * CONCURRENCY),
        "mixed": lambda: run(lora_llm, prompts, mixed_loras),
        "base_on_lora_engine": lambda: run(lora_llm, prompts, [None] * CONCURRENCY),
    }
    for fn in runs.values():  # warm up every path once
        fn()
    rounds = []
    for r in range(args.rounds):
        order = list(runs) if r % 2 == 0 else list(reversed(runs))
        result = {name: runs[name]() for name in order}
        rounds.append(result)
        print(
            f"round {r + 1}: " + ", ".join(f"{n} {result[n]['tok_s']:.1f} tok/s" for n in runs),
            flush=True,
        )
    base_llm.close()
    lora_llm.close()
    report(rounds)


def report(rounds: list[dict]) -> None:
    ratios = [r["mixed"]["tok_s"] / r["base"]["tok_s"] for r in rounds]
    print_median_ratio("mixed adapters / base", ratios, 0.8)
    fields = {"ratios": ratios, "rounds": rounds, "adapters": ADAPTERS, "rank": RANK}
    save_result(
        "lora",
        fields,
        f"{THREADS} threads",
        anchor="the base model on an engine without LoRA, same process",
        summary=summarize(fields),
    )


def summarize(fields: dict) -> list[dict]:
    rounds, ratios = fields["rounds"], fields["ratios"]
    med = statistics.median
    tok_s = {name: med(r[name]["tok_s"] for r in rounds) for name in rounds[0]}
    own = [r["base_on_lora_engine"]["tok_s"] / r["base"]["tok_s"] for r in rounds]
    return [
        row(
            f"{CONCURRENCY} requests at once on {ADAPTERS} adapters (rank {RANK}, all "
            f"projections), output tok/s, small-llama bf16 (ratio: median of {len(rounds)} rounds, "
            f"{min(ratios):.2f}-{max(ratios):.2f})",
            f"{tok_s['mixed']:.1f} tok/s",
            f"{tok_s['base']:.1f} tok/s",
            med(ratios),
            "≥ 0.8×",
            med(ratios) >= 0.8,
        ),
        row(
            f"the same requests without adapters, on the engine serving them "
            f"({min(own):.2f}-{max(own):.2f})",
            f"{tok_s['base_on_lora_engine']:.1f} tok/s",
            f"{tok_s['base']:.1f} tok/s",
            med(own),
        ),
    ]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", help="keep the model and adapters here (reused)")
    parser.add_argument("--rounds", type=int, default=3)
    return parser.parse_args()


if __name__ == "__main__":
    main()
