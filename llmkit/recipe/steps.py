"""What each kind of recipe step does, through the same library calls as the commands."""

from __future__ import annotations

import contextlib
from pathlib import Path

from llmkit.recipe.schema import Bench, Quantize, Shard, Source


def make_source(source: Source, out: Path) -> Path:
    """The source checkpoint's directory: a preset written to `out`, a local path, or a hub
    snapshot."""
    if source.init is not None:
        from llmkit.checkpoint.init import init_checkpoint

        return Path(init_checkpoint(out, source.init, source.seed, source.dtype, True).path)
    from llmkit.checkpoint.reader import local_dir

    return Path(local_dir(source.path or source.hub, source.revision))


def quantize(step: Quantize, src: Path, out: Path) -> dict:
    from llmkit.quant.calibration import CalibrationSpec
    from llmkit.quant.pipeline import quantize as run

    report = run(
        src,
        out,
        step.method,
        options=step.method_options(),
        calibration=CalibrationSpec(**step.calibration.model_dump()),
        device=step.device,
        overwrite=True,
    )
    return {"bytes_out": report.bytes_out, "seconds": report.seconds}


def shard(step: Shard, src: Path, out: Path) -> dict:
    from llmkit.shard.write import shard as run

    report = run(src, out, step.tp, step.pp, vocab_pad=step.vocab_pad, overwrite=True)
    return {"tp": report.tp, "pp": report.pp, "seconds": report.seconds}


def bench(step: Bench, paths: dict[str, Path]) -> tuple[dict, list[tuple[str, dict]]]:
    """The bench's result JSON, and the (label, metrics) its thresholds are checked on."""
    return _BENCHES[step.kind](getattr(step, step.kind), paths)


def _quality(q, paths) -> tuple[dict, list]:
    from llmkit.bench.quality import EVAL_SEED, evaluate_quality
    from llmkit.quant.calibration import CalibrationSpec

    data = CalibrationSpec(seq_len=q.seq_len, seed=EVAL_SEED)
    names = [q.reference, *q.candidates]
    rows = evaluate_quality(
        paths[q.reference], [paths[c] for c in q.candidates], data, q.num_windows
    )
    result = [dict(r.to_dict(), name=n) for n, r in zip(names, rows, strict=True)]
    return {"rows": result}, [(r["name"], r) for r in result[1:]]


def _offline(o, paths) -> tuple[dict, list]:
    from llmkit.bench.offline import OfflineSpec, offline_in_child
    from llmkit.runtime.engine_config import EngineConfig

    spec = OfflineSpec(
        tuple(o.batch_sizes), tuple(o.input_len), tuple(o.output_len), lora=_resolved(o.lora)
    )
    result = offline_in_child(str(paths[o.model]), spec, EngineConfig(**_speculation(o, paths)))
    top = {k: v for k, v in result.items() if k != "cases"}
    labelled = [(f"batch {c['batch_size']}", {**top, **c}) for c in result["cases"]]
    return result, labelled


def _compare(c, paths) -> tuple[dict, list]:
    from llmkit.bench.compare import CompareSpec, compare
    from llmkit.bench.quality import EVAL_SEED
    from llmkit.quant.calibration import CalibrationSpec
    from llmkit.runtime.engine_config import EngineConfig

    data = CalibrationSpec(seq_len=c.seq_len, seed=EVAL_SEED)
    checkpoints = [str(paths[name]) for name in c.checkpoints]
    spec = CompareSpec(c.concurrency, c.input_len, c.output_len, c.num_windows)
    rows = compare(checkpoints, spec, data, EngineConfig())
    for name, row in zip(c.checkpoints, rows, strict=True):
        row["name"] = name
    return {"rows": rows}, [(r["name"], r) for r in rows]


def _serve(s, paths) -> tuple[dict, list]:
    import math

    from llmkit.bench.load import LoadSpec, run_load
    from llmkit.bench.offline import ADAPTER
    from llmkit.bench.prompts import load_requests, parse_range

    if s.model:
        served = _served(paths[s.model], _resolved(s.lora), _speculation(s, paths))
    else:
        served = contextlib.nullcontext(s.url)
    with served as url:
        rate = math.inf if s.request_rate == "inf" else float(s.request_rate)
        name = ADAPTER if s.lora else s.served_model
        spec = LoadSpec(url, name, s.endpoint, rate, s.burstiness, s.max_concurrency,
                        s.ignore_eos, s.seed)  # fmt: skip
        vocab = _vocab_size(paths[s.model]) if s.model else 256
        requests = load_requests(
            "random", s.num_prompts, parse_range(str(s.input_len), "input_len"),
            parse_range(str(s.output_len), "output_len"), s.seed, random_vocab=vocab,
        )  # fmt: skip
        result = run_load(spec, requests)
    return result, [("", result)]


@contextlib.contextmanager
def _served(model: Path, lora: str | None, speculation: dict):
    """`llmkit serve MODEL` (with `lora` as the adapter ADAPTER, and the EngineConfig
    fields `speculation` as their options) on a free loopback port for the duration;
    yields its URL."""
    from llmkit.bench.offline import ADAPTER, with_adapter
    from llmkit.net import free_port
    from llmkit.runtime.engine_config import EngineConfig
    from llmkit.serve.launch import launched, llmkit_serve_command

    port = free_port()
    command = llmkit_serve_command(model, port)
    if lora is not None:
        rank = with_adapter(EngineConfig(), lora).max_lora_rank
        command += ["--lora", f"{ADAPTER}={lora}", "--max-lora-rank", str(rank)]
    for field, value in speculation.items():
        command += [f"--{field.replace('_', '-')}", str(value)]
    with launched(command, port) as server:
        yield server.url


def _speculation(body, paths: dict[str, Path]) -> dict:
    """The EngineConfig fields a bench's `speculative` options set (none: it does not)."""
    if body.speculative is None:
        return {}
    draft = body.draft()
    return {"speculative": str(paths[draft]) if draft else body.speculative,
            **body.engine_fields()}  # fmt: skip


def _resolved(path: str | None) -> str | None:
    from llmkit.runtime.lora_registry import adapter_dir

    return None if path is None else adapter_dir(path)


def _vocab_size(path: Path) -> int:
    import json

    return int(json.loads((path / "config.json").read_text())["vocab_size"])


_BENCHES = {"quality": _quality, "offline": _offline, "compare": _compare, "serve": _serve}
