"""llama.cpp as an anchor: its tools, built from the source in the llama-cpp-python sdist by
`bash benchmarks/setup_reference_venvs.sh llamacpp` under .refvenvs/llamacpp, and its
convert_hf_to_gguf.py, run in that venv."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

LLAMACPP = Path(__file__).resolve().parent.parent / ".refvenvs" / "llamacpp"

# convert_hf_to_gguf.py with an unrecognised BPE pre-tokenizer taken as the default one
CONVERT = """
import runpy, sys
sys.path.insert(0, {src!r})
from conversion import base
known = base.TextModel.get_vocab_base_pre
def pre(self, tokenizer):
    try:
        return known(self, tokenizer)
    except NotImplementedError:
        return "default"
base.TextModel.get_vocab_base_pre = pre
sys.argv = ["convert_hf_to_gguf.py", *{args!r}]
runpy.run_path({script!r}, run_name="__main__")
"""


def run(command: list, **kwargs) -> str:
    """The command's stdout; exits with its stderr's end where it fails."""
    done = subprocess.run(command, capture_output=True, text=True, **kwargs)
    if done.returncode != 0:
        sys.exit(f"{' '.join(map(str, command))} failed:\n{done.stderr[-3000:]}")
    return done.stdout


def to_gguf(model: Path, out: Path, outtype: str) -> Path:
    """`model` (a transformers checkpoint directory) as a GGUF file of `outtype` (bf16,
    f32, ...), made once."""
    if not out.exists():
        src = LLAMACPP / "src"
        args = [str(model), "--outtype", outtype, "--outfile", str(out)]
        code = CONVERT.format(src=str(src), args=args, script=str(src / "convert_hf_to_gguf.py"))
        run([str(LLAMACPP / "bin" / "python"), "-c", code])
    return out


def speculative(target: Path, prompt: str, tokens: int, threads: int, spec: list) -> dict:
    """llama-speculative-simple: `prompt` decoded greedily, `tokens` tokens (EOS ignored;
    it may overshoot by a draft), drafted as `spec` says (draft_spec, lookup_spec). Its
    decode tok/s (the tokens over the time after the prompt's), the prompt's tokens, and the
    draft tokens it proposed and accepted. A run whose log lacks one of them runs again, up
    to TRIES times in all: a run has exited 0 with its decoded line printed but not the
    counts printed after it."""
    for _ in range(TRIES):
        log = _speculative_log(target, prompt, tokens, threads, spec)
        found = [re.search(pattern, log) for pattern in SPECULATIVE_COUNTS]
        if all(found):
            break
    else:
        sys.exit(f"llama-speculative-simple printed no counts in {TRIES} runs:\n{log[-3000:]}")
    decoded, prompt_tokens, drafted, accepted = found
    return {
        "decode_tok_s": int(decoded.group(1)) / float(decoded.group(2)),
        "prompt_tokens": int(prompt_tokens.group(1)),
        "proposed": int(drafted.group(1)),
        "accepted": int(accepted.group(1)),
    }


def draft_spec(draft: Path, k: int, threads: int) -> list:
    """Drafts of a draft model (draft-simple; its p-min default: every draft k tokens)."""
    return ["-md", draft, "-td", threads, "--spec-type", "draft-simple", "--spec-draft-n-max", k]


def lookup_spec(key: int, k: int) -> list:
    """Prompt lookup: drafts of the k tokens that followed the last `key` tokens where they
    appeared before in the context (ngram-map-k: a map of the context's n-grams)."""
    return ["--spec-type", "ngram-map-k", "--spec-ngram-map-k-size-n", key,
            "--spec-ngram-map-k-size-m", k, "--spec-draft-n-max", k]  # fmt: skip


TRIES = 3
CONTEXT = 2048  # llama-speculative-simple's: the longest prompt with its tokens
# what speculative() reads from the log: decoded tokens and seconds, the prompt's tokens, the
# draft tokens proposed and accepted
SPECULATIVE_COUNTS = (
    r"decoded\s+(\d+) tokens in\s+([\d.]+) seconds",
    r"encoded\s+(\d+) tokens",
    r"n_drafted\s*=\s*(\d+)",
    r"n_accept\s*=\s*(\d+)",
)


def _speculative_log(target: Path, prompt: str, tokens: int, threads: int, spec: list) -> str:
    """One run of llama-speculative-simple (see speculative()): its stdout and stderr."""
    tool = LLAMACPP / "build" / "bin" / "llama-speculative-simple"
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as file:
        file.write(prompt)
        file.flush()
        command = [tool, "-m", target, "-f", file.name, "-n", tokens, "-t", threads,
                   "--temp", "0", "--ignore-eos", "-c", CONTEXT, *spec]  # fmt: skip
        done = subprocess.run([str(c) for c in command], capture_output=True, text=True)
    log = done.stdout + done.stderr
    if done.returncode != 0:
        sys.exit(f"{tool.name} failed:\n{log[-3000:]}")
    return log


def plain_tok_s(model: Path, tokens: int, depth: int, threads: int) -> float:
    """llama-bench: `tokens` decoded after `depth` tokens of context (one repetition)."""
    bench = LLAMACPP / "build" / "bin" / "llama-bench"
    out = run([str(bench), "-m", str(model), "-p", "0", "-n", str(tokens), "-d", str(depth),
               "-t", str(threads), "-r", "1", "-o", "json"])  # fmt: skip
    return float(json.loads(out)[0]["avg_ts"])
