"""lm-evaluation-harness through `llmkit serve` against the harness's own transformers
backend: the same tasks on the same model must score the same.

Two models: stories260K (../shared; a trained Llama with a sentencepiece tokenizer) and the
tiny-llama preset (made under --workdir; random weights, a byte-level BPE tokenizer). Two
tasks, written under --workdir from the held-out end of tinyshakespeare and read by the
harness with --include_path:

- shakespeare_next_line (multiple choice): a line of the play, and four candidates for the
  line after it (acc, acc_norm);
- shakespeare_ppl (rolling log-likelihood): 20 passages short enough for one window of the
  model's context (word_perplexity, byte_perplexity, bits_per_byte). Longer passages are cut
  into windows by the harness, and with text prompts it sends each window as the text its
  tokenizer decodes, which re-tokenizes differently where a window starts inside a word: a
  limit of text prompts, not of the server.

Backends: `hf` (the model in float32, BOS as its tokenizer adds it, max_length 500) and
`local-completions` against `llmkit serve MODEL --dtype float32`, once with text prompts
(`tokenized_requests=False`, `add_bos_token=True`: the harness writes BOS into the text and
the server adds no second one) and once with token-id prompts; max_length 502 gives the same
windows as the hf backend's 500 (the API backend keeps one token for generation and one for
context). The harness runs from its own venv (.refvenvs/lmeval, made by
benchmarks/setup_reference_venvs.sh lmeval), offline. Target: every metric equal (relative
difference <= 1e-4). Writes benchmarks/results/lm_eval_compat-<date>.json.

    python benchmarks/lm_eval_compat.py [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import tempfile
from pathlib import Path

from report import row, save_result

HERE = Path(__file__).resolve().parent
HARNESS = HERE.parent / ".refvenvs" / "lmeval" / "bin" / "lm_eval"
SHARED = HERE.parent.parent / "shared"
TASKS = {"shakespeare_next_line": ("acc", "acc_norm"),
         "shakespeare_ppl": ("word_perplexity", "byte_perplexity", "bits_per_byte")}  # fmt: skip
TOLERANCE = 1e-4
HF_MAX_LENGTH = 500

MC_TASK = """task: shakespeare_next_line
dataset_path: json
dataset_kwargs:
  data_files: {{test: {path}}}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}\\n"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: gold
metric_list:
  - {{metric: acc, aggregation: mean, higher_is_better: true}}
  - {{metric: acc_norm, aggregation: mean, higher_is_better: true}}
"""
PPL_TASK = """task: shakespeare_ppl
dataset_path: json
dataset_kwargs:
  data_files: {{test: {path}}}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - {{metric: word_perplexity, aggregation: weighted_perplexity, higher_is_better: false}}
  - {{metric: byte_perplexity, aggregation: weighted_perplexity, higher_is_better: false}}
  - {{metric: bits_per_byte, aggregation: bits_per_byte, higher_is_better: false}}
"""


def write_tasks(work: Path) -> Path:
    """The two tasks' data and YAML under work/tasks; returns that directory."""
    text = (SHARED / "data" / "tinyshakespeare.txt").read_text(encoding="utf-8")
    held = text[int(len(text) * 0.8) :]
    lines = [line.strip() for line in held.splitlines() if len(line.strip()) > 20]
    rng = random.Random(0)
    docs = []
    for i in rng.sample(range(len(lines) - 1), 60):
        choices = rng.sample([x for j, x in enumerate(lines) if j not in (i, i + 1)], 3)
        choices.append(lines[i + 1])
        rng.shuffle(choices)
        docs.append({"context": lines[i], "choices": choices, "gold": choices.index(lines[i + 1])})
    passages = [p.strip() for p in held.split("\n\n") if 200 < len(p.strip()) < 1000][:20]
    tasks = work / "tasks"
    tasks.mkdir(parents=True, exist_ok=True)
    _jsonl(tasks / "mc.jsonl", docs)
    _jsonl(tasks / "ppl.jsonl", [{"text": p} for p in passages])
    (tasks / "shakespeare_next_line.yaml").write_text(MC_TASK.format(path=tasks / "mc.jsonl"))
    (tasks / "shakespeare_ppl.yaml").write_text(PPL_TASK.format(path=tasks / "ppl.jsonl"))
    return tasks


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def harness(model: str, model_args: str, tasks: Path, out: Path, *extra: str) -> dict:
    """Run lm_eval; {task: {metric: value}}."""
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    command = [str(HARNESS), "run", "--model", model, "--model_args", model_args,
               "--tasks", ",".join(TASKS), "--include_path", str(tasks),
               "--output_path", str(out), *extra]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"lm_eval failed:\n{done.stderr[-3000:]}")
    result = json.loads(max(out.rglob("results_*.json"), key=os.path.getmtime).read_text())
    return {
        task: {m: result["results"][task][f"{m},none"] for m in metrics}
        for task, metrics in TASKS.items()
    }


def run_model(name: str, model: Path, tasks: Path, work: Path) -> dict:
    from llmkit.net import free_port
    from llmkit.serve.launch import launched, llmkit_serve_command

    scores = {"hf": harness("hf", f"pretrained={model},dtype=float32,max_length={HF_MAX_LENGTH}",
                            tasks, work / f"{name}-hf", "--batch_size", "8")}  # fmt: skip
    port = free_port()
    command = [*llmkit_serve_command(model, port), "--dtype", "float32"]
    with launched(command, port) as server:
        base = (f"base_url={server.url}/v1/completions,model={model.name},tokenizer={model},"
                f"tokenizer_backend=huggingface,max_length={HF_MAX_LENGTH + 2}")  # fmt: skip
        modes = {"text": "tokenized_requests=False", "token ids": "tokenized_requests=True"}
        for mode, args in modes.items():
            out = work / f"{name}-{mode.replace(' ', '-')}"
            scores[mode] = harness("local-completions", f"{base},{args},add_bos_token=True",
                                   tasks, out)  # fmt: skip
    for mode in ("text", "token ids"):
        for task, metrics in TASKS.items():
            for m in metrics:
                print(f"{name:12} {mode:9} {m:16} llmkit {scores[mode][task][m]:.6g} "
                      f"hf {scores['hf'][task][m]:.6g}")  # fmt: skip
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", help="tasks, models and harness outputs go here")
    args = parser.parse_args()
    if not HARNESS.is_file():
        raise SystemExit("no harness: run bash benchmarks/setup_reference_venvs.sh lmeval")
    from llmkit.checkpoint.init import init_checkpoint

    work = Path(args.workdir or tempfile.mkdtemp(prefix="llmkit-lmeval-"))
    work.mkdir(parents=True, exist_ok=True)
    tasks = write_tasks(work)
    tiny = work / "tiny-llama"
    if not (tiny / "config.json").is_file():
        init_checkpoint(tiny, "tiny-llama", 0, "float32", True)
    models = {"stories260K": SHARED / "models" / "stories260K", "tiny-llama": tiny}
    scores = {name: run_model(name, path, tasks, work) for name, path in models.items()}
    fields = {"scores": scores, "tolerance": TOLERANCE}
    save_result("lm_eval_compat", fields, anchor="lm-evaluation-harness's hf backend, same tasks",
                summary=summarize(fields))  # fmt: skip


def summarize(fields: dict) -> list[dict]:
    """One row per model and prompt kind: every metric of both tasks against the hf
    backend's (equal within the tolerance)."""
    rows = []
    for name, scores in fields["scores"].items():
        tokenizer = "sentencepiece" if name == "stories260K" else "byte-level BPE"
        for mode in ("text", "token ids"):
            pairs = [
                (scores[mode][t][m], scores["hf"][t][m]) for t, ms in TASKS.items() for m in ms
            ]
            same = all(abs(a - b) <= fields["tolerance"] * max(abs(b), 1e-12) for a, b in pairs)
            names = ", ".join(m for ms in TASKS.values() for m in ms)
            rows.append(row(
                f"{name} ({tokenizer}), {mode} prompts: {names}",
                " / ".join(f"{a:.6g}" for a, _ in pairs),
                " / ".join(f"{b:.6g}" for _, b in pairs),
                None, "equal", same,
            ))  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
