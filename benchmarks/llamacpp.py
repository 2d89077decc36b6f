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


def speculative(target: Path, draft: Path, prompt: str, tokens: int, k: int, threads: int):
    """llama-speculative-simple: `prompt` decoded greedily, `tokens` tokens (EOS ignored;
    it may overshoot by a draft), `draft` proposing k tokens a round (draft-simple, its
    p-min default: every draft k tokens). Its decode tok/s (the tokens over the time after
    the prompt's), the prompt's tokens, and the draft tokens it proposed and accepted."""
    tool = LLAMACPP / "build" / "bin" / "llama-speculative-simple"
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as file:
        file.write(prompt)
        file.flush()
        command = [tool, "-m", target, "-md", draft, "-f", file.name, "-n", tokens,
                   "-t", threads, "-td", threads, "--temp", "0", "--ignore-eos", "-c", 1024,
                   "--spec-type", "draft-simple", "--spec-draft-n-max", k]  # fmt: skip
        done = subprocess.run([str(c) for c in command], capture_output=True, text=True)
    log = done.stdout + done.stderr
    found = re.search(r"decoded\s+(\d+) tokens in\s+([\d.]+) seconds", log)
    if done.returncode != 0 or found is None:
        sys.exit(f"{tool.name} failed:\n{log[-3000:]}")
    counts = {
        n: int(re.search(rf"{n}\s*=\s*(\d+)", log).group(1)) for n in ("n_drafted", "n_accept")
    }
    return {
        "decode_tok_s": int(found.group(1)) / float(found.group(2)),
        "prompt_tokens": int(re.search(r"encoded\s+(\d+) tokens", log).group(1)),
        "proposed": counts["n_drafted"],
        "accepted": counts["n_accept"],
    }


def plain_tok_s(model: Path, tokens: int, depth: int, threads: int) -> float:
    """llama-bench: `tokens` decoded after `depth` tokens of context (one repetition)."""
    bench = LLAMACPP / "build" / "bin" / "llama-bench"
    out = run([str(bench), "-m", str(model), "-p", "0", "-n", str(tokens), "-d", str(depth),
               "-t", str(threads), "-r", "1", "-o", "json"])  # fmt: skip
    return float(json.loads(out)[0]["avg_ts"])
