"""Structured outputs' cost: 64 JSON-schema-guided requests at once against the same requests
unguided, on the same engine in one run.

Model: the small-llama preset in bfloat16 (made under --workdir once), 2 threads. Each
round runs the 64 guided requests (a schema of nested objects, arrays and enums; temperature
1, one seed per request), then the same prompts unguided with each request's max_tokens set
to the tokens its guided twin produced and EOS ignored, so both runs generate the same
tokens per sequence and finish in the same order (in odd rounds the unguided run goes first,
with the lengths of the round before: the guided lengths of a round can differ a little,
since a sequence's logits depend on the batch it shares): the only difference is the guide (masks
computed per step on llguidance's threads while the model runs, applied in the sampler, each
token fed back). The order alternates between rounds. Reported: output tok/s of each, their
ratio (target: guided >= 0.9x unguided; median of the rounds and the spread), and the time
the mask computations took (they overlap the forward pass, so this is an upper bound on what
they add). Writes benchmarks/results/structured_outputs-<date>.json.

    python benchmarks/structured_outputs.py [--workdir DIR] [--rounds 3]
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
SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 24},
        "people": {
            "type": "array",
            "minItems": 3,
            "maxItems": 6,
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 12},
                    "age": {"type": "integer", "minimum": 0, "maximum": 120},
                    "role": {"enum": ["king", "queen", "knight", "fool", "farmer"]},
                },
                "required": ["name", "age", "role"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["title", "people"],
    "additionalProperties": False,
}


def make_model(work: Path) -> Path:
    from llmkit.checkpoint.init import init_checkpoint

    model = work / "small-llama-bf16"
    if not (model / "config.json").is_file():
        init_checkpoint(model, "small-llama", 0, "bfloat16", True)
    return model


def timed_masks(llm) -> list[float]:
    """Wrap the engine's mask computation to record the seconds of each call."""
    guides, spent = llm.engine.guides, []
    compute = guides.masks

    def masks(seq_ids):
        start = time.perf_counter()
        try:
            return compute(seq_ids)
        finally:
            spent.append(time.perf_counter() - start)

    guides.masks = masks
    return spent


def run_guided(llm, prompts: list[str], spent: list[float]) -> dict:
    from llmkit.runtime.guide import Guide
    from llmkit.runtime.sequence import SamplingParams

    guide = Guide("json", json.dumps(SCHEMA))
    params = [
        SamplingParams(max_tokens=400, temperature=1.0, seed=i, guide=guide)
        for i in range(len(prompts))
    ]
    spent.clear()
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    seconds = time.perf_counter() - start
    lengths = [len(o.outputs[0].token_ids) for o in outs]
    valid = sum(_valid(o.outputs[0].text) for o in outs)
    return {"seconds": seconds, "lengths": lengths, "valid": valid, "mask_s": sum(spent),
            "mask_calls": len(spent)}  # fmt: skip


def run_plain(llm, prompts: list[str], lengths: list[int]) -> dict:
    from llmkit.runtime.sequence import SamplingParams

    params = [
        SamplingParams(max_tokens=n, temperature=1.0, seed=i, ignore_eos=True)
        for i, n in enumerate(lengths)
    ]
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    seconds = time.perf_counter() - start
    assert [len(o.outputs[0].token_ids) for o in outs] == lengths
    return {"seconds": seconds, "lengths": lengths}


def _valid(text: str) -> bool:
    import jsonschema

    try:
        jsonschema.validate(json.loads(text), SCHEMA)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def main() -> None:
    args = parse_args()
    from llmkit.runtime.engine import LLM, EngineConfig

    work = Path(args.workdir or tempfile.mkdtemp(prefix="llmkit-guided-"))
    work.mkdir(parents=True, exist_ok=True)
    model = make_model(work)
    llm = LLM(model, EngineConfig(threads=THREADS, max_num_seqs=CONCURRENCY))
    spent = timed_masks(llm)
    prompts = [f"Story {i}: the people of the castle, as JSON:" for i in range(CONCURRENCY)]
    warm = run_guided(llm, prompts[:8], spent)
    run_plain(llm, prompts[:8], warm["lengths"])
    rounds = []
    for r in range(args.rounds):
        if r % 2 == 0:
            guided = run_guided(llm, prompts, spent)
            plain = run_plain(llm, prompts, guided["lengths"])
        else:  # the lengths of the round before's guided run, then guided
            plain = run_plain(llm, prompts, rounds[-1]["guided"]["lengths"])
            guided = run_guided(llm, prompts, spent)
        tokens = sum(guided["lengths"])
        rounds.append({
            "guided": guided, "plain": plain, "tokens": tokens,
            "guided_tok_s": tokens / guided["seconds"],
            "plain_tok_s": sum(plain["lengths"]) / plain["seconds"],
        })  # fmt: skip
        last = rounds[-1]
        print(
            f"round {r + 1}: guided {last['guided_tok_s']:.1f} tok/s, unguided "
            f"{last['plain_tok_s']:.1f} tok/s ({tokens} tokens; {guided['valid']}/"
            f"{CONCURRENCY} valid; masks {guided['mask_s']:.2f} s in {guided['mask_calls']} "
            "steps)",
            flush=True,
        )
    llm.close()
    report(rounds)


def report(rounds: list[dict]) -> None:
    ratios = [r["guided_tok_s"] / r["plain_tok_s"] for r in rounds]
    print_median_ratio("guided / unguided", ratios, 0.9)
    fields = {"ratios": ratios, "rounds": rounds, "schema": SCHEMA}
    save_result(
        "structured_outputs",
        fields,
        f"{THREADS} threads",
        anchor="the same requests unguided, same engine",
        summary=summarize(fields),
    )


def summarize(fields: dict) -> list[dict]:
    rounds, ratios = fields["rounds"], fields["ratios"]
    med = statistics.median
    guided = med(r["guided_tok_s"] for r in rounds)
    plain = med(r["plain_tok_s"] for r in rounds)
    mask_share = med(r["guided"]["mask_s"] / r["guided"]["seconds"] for r in rounds)
    per_token_us = med(1e6 * r["guided"]["mask_s"] / r["tokens"] for r in rounds)
    valid = min(r["guided"]["valid"] for r in rounds)
    return [
        row(
            f"{CONCURRENCY} JSON-schema requests at once, output tok/s, small-llama bf16 "
            f"(ratio: median of {len(rounds)} rounds, {min(ratios):.2f}-{max(ratios):.2f})",
            f"{guided:.1f} tok/s",
            f"{plain:.1f} tok/s",
            med(ratios),
            "≥ 0.9×",
            med(ratios) >= 0.9,
        ),
        row(
            "mask computation, per generated token (overlaps the forward pass)",
            f"{per_token_us:.0f} µs ({mask_share:.1%} of the guided run's time)",
            "",
            None,
        ),
        row(
            f"answers that validate against the schema (fewest of a round, of {CONCURRENCY})",
            str(valid),
            "",
            None,
            f"{CONCURRENCY}",
            valid == CONCURRENCY,
        ),
    ]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", help="keep the model here (reused)")
    parser.add_argument("--rounds", type=int, default=3)
    return parser.parse_args()


if __name__ == "__main__":
    main()
