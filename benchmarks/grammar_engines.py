"""The grammar engines for structured outputs side by side: llguidance (what llmkit runs),
xgrammar and outlines-core, on the same schema, tokenizer and token sequences.

The schema is benchmarks/structured_outputs.py's (nested objects, an array of 3-6 items,
enums, bounded integers and strings). 64 documents that satisfy it are drawn at random
(seeded) and tokenized with the small-llama preset's byte-level BPE tokenizer (32,000
tokens; made under --workdir once), each followed by EOS. For each engine: the seconds to
compile the schema for that tokenizer (after its one-time tokenizer setup, reported too),
then per document a fresh matcher that, for every token, writes the bit mask of the tokens
allowed next (one row of int32 words, as a sampler takes it), checks the document's token is
allowed, and advances. Reported: microseconds per token (mask + advance, the work a guided
sequence adds to each decode step), the compile and setup times, and how many documents an
engine refused a token of (it then stops on that document). The engines run in their own
venv (.refvenvs/grammars, made by benchmarks/setup_reference_venvs.sh grammars), one after
another in one process, in each of --rounds fresh processes. Writes
benchmarks/results/grammar_engines-<date>.json.

    python benchmarks/grammar_engines.py [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import string
import subprocess
import tempfile
import time
from pathlib import Path

from report import row, save_result
from structured_outputs import SCHEMA

HERE = Path(__file__).resolve().parent
PYTHON = HERE.parent / ".refvenvs" / "grammars" / "bin" / "python"
DOCUMENTS = 64
ENGINES = ("llguidance", "xgrammar", "outlines-core")


def random_document(rng: random.Random) -> dict:
    """One value SCHEMA accepts."""
    props = SCHEMA["properties"]
    item = props["people"]["items"]["properties"]

    def word(limit: int) -> str:
        return "".join(rng.choices(string.ascii_letters + " ", k=rng.randint(1, limit)))

    people = [
        {"name": word(item["name"]["maxLength"]), "age": rng.randint(0, 120),
         "role": rng.choice(item["role"]["enum"])}
        for _ in range(rng.randint(props["people"]["minItems"], props["people"]["maxItems"]))
    ]  # fmt: skip
    return {"title": word(props["title"]["maxLength"]), "people": people}


def make_inputs(work: Path) -> Path:
    """work/inputs.json: the tokenizer's directory, the schema and the documents' token ids."""
    from llmkit.checkpoint.fast_tokenizer import load_tokenizer
    from llmkit.checkpoint.init import init_checkpoint

    model = work / "small-llama-bf16"
    if not (model / "config.json").is_file():
        init_checkpoint(model, "small-llama", 0, "bfloat16", True)
    tok = load_tokenizer(model)
    rng = random.Random(0)
    docs = [json.dumps(random_document(rng)) for _ in range(DOCUMENTS)]
    ids = [[*tok.encode(d, add_special_tokens=False), tok.eos_token_id] for d in docs]
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    path = work / "inputs.json"
    path.write_text(json.dumps({"model": str(model), "vocab_size": vocab, "schema": SCHEMA,
                                "eos": tok.eos_token_id, "documents": ids}))  # fmt: skip
    return path


# ---------------------------------------------------------------------------------------
# In the grammars venv: each engine as (setup, compile, new matcher, fill mask, advance).


def _llguidance(inputs: dict, hf):
    import llguidance
    import llguidance.hf
    import numpy as np

    start = time.perf_counter()
    tokenizer = llguidance.hf.from_tokenizer(hf, n_vocab=inputs["vocab_size"])
    setup = time.perf_counter() - start
    start = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(inputs["schema"]))
    first = llguidance.LLMatcher(tokenizer, grammar)
    assert not first.is_error(), first.get_error()
    compiled = time.perf_counter() - start
    words = (inputs["vocab_size"] + 31) // 32
    mask = np.zeros(words, dtype=np.int32)

    def fill(m) -> None:
        m.unsafe_compute_mask_ptr(mask.ctypes.data, mask.nbytes)

    return setup, compiled, first.deep_copy, fill, lambda m, t: m.consume_token(t), mask


def _xgrammar(inputs: dict, hf):
    import xgrammar as xgr

    start = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=inputs["vocab_size"])
    compiler = xgr.GrammarCompiler(info, max_threads=1)
    setup = time.perf_counter() - start
    start = time.perf_counter()
    grammar = compiler.compile_json_schema(json.dumps(inputs["schema"]))
    compiled = time.perf_counter() - start
    mask = xgr.allocate_token_bitmask(1, inputs["vocab_size"])

    def fill(m) -> None:
        m.fill_next_token_bitmask(mask)

    return setup, compiled, lambda: xgr.GrammarMatcher(grammar), fill, \
        lambda m, t: m.accept_token(t), mask[0].numpy()  # fmt: skip


def _outlines(inputs: dict, hf):
    import numpy as np
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    start = time.perf_counter()
    vocabulary = Vocabulary(inputs["eos"], _token_bytes(hf, inputs["eos"]))
    setup = time.perf_counter() - start
    start = time.perf_counter()
    index = Index(build_regex_from_schema(json.dumps(inputs["schema"])), vocabulary)
    compiled = time.perf_counter() - start
    words = (inputs["vocab_size"] + 31) // 32
    mask = np.zeros(words, dtype=np.int32)

    def fill(g) -> None:
        g.write_mask_into(mask.ctypes.data, words, 4)

    return setup, compiled, lambda: Guide(index), fill, lambda g, t: g.advance(t), mask


def _token_bytes(hf, eos: int) -> dict[bytes, list[int]]:
    """Each ordinary token's bytes (byte-level BPE: GPT-2's byte-to-character table undone)."""
    chars = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
             *range(ord("®"), ord("ÿ") + 1)]  # fmt: skip
    codes, extra = list(chars), 0
    for b in range(256):
        if b not in chars:
            chars.append(b)
            codes.append(256 + extra)
            extra += 1
    to_byte = {chr(c): b for b, c in zip(chars, codes, strict=True)}
    special = set(hf.all_special_ids)
    table: dict[bytes, list[int]] = {}
    for token, i in hf.get_vocab().items():
        if i != eos and i not in special:
            table.setdefault(bytes(to_byte[ch] for ch in token), []).append(i)
    return table


def _allowed(mask, token: int) -> bool:
    return bool((int(mask[token // 32]) >> (token % 32)) & 1)


def child(inputs_path: str) -> None:
    from transformers import AutoTokenizer

    inputs = json.loads(Path(inputs_path).read_text())
    hf = AutoTokenizer.from_pretrained(inputs["model"])
    results = {}
    for name, build in zip(ENGINES, (_llguidance, _xgrammar, _outlines), strict=True):
        setup, compiled, new, fill, advance, mask = build(inputs, hf)
        seconds, tokens, refused = 0.0, 0, 0
        for doc in inputs["documents"]:
            matcher = new()
            for token in doc:
                start = time.perf_counter()
                fill(matcher)
                if not _allowed(mask, token):  # the engine refuses a valid document
                    refused += 1
                    break
                if token != inputs["eos"]:  # EOS ends the sequence: nothing to feed back
                    advance(matcher, token)
                seconds += time.perf_counter() - start
                tokens += 1
        results[name] = {"setup_s": setup, "compile_s": compiled, "tokens": tokens,
                         "us_per_token": 1e6 * seconds / tokens, "refused": refused}  # fmt: skip
    print(json.dumps(results))


# ---------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", help="the tokenizer's model and the inputs go here")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child)
    if not PYTHON.is_file():
        raise SystemExit("no grammars venv: run bash benchmarks/setup_reference_venvs.sh grammars")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="llmkit-grammars-"))
    work.mkdir(parents=True, exist_ok=True)
    inputs = make_inputs(work)
    rounds = []
    for r in range(args.rounds):
        done = subprocess.run([str(PYTHON), __file__, "--child", str(inputs)],
                              capture_output=True, text=True)  # fmt: skip
        if done.returncode != 0:
            raise SystemExit(f"the engines' run failed:\n{done.stderr[-3000:]}")
        rounds.append(json.loads(done.stdout.strip().splitlines()[-1]))
        each = (f"{n} {x['us_per_token']:.0f} us/token" for n, x in rounds[-1].items())
        print(f"round {r + 1}: " + ", ".join(each), flush=True)
    fields = {"rounds": rounds, "documents": DOCUMENTS, "schema": SCHEMA}
    save_result("grammar_engines", fields, "1 thread",
                anchor="xgrammar and outlines-core, same inputs, one process",
                summary=summarize(fields))  # fmt: skip


def summarize(fields: dict) -> list[dict]:
    rounds = fields["rounds"]

    def med(name: str, key: str) -> float:
        return statistics.median(r[name][key] for r in rounds)

    ours = med("llguidance", "us_per_token")
    rows = []
    for name in ENGINES[1:]:
        ratios = [r[name]["us_per_token"] / r["llguidance"]["us_per_token"] for r in rounds]
        rows.append(row(
            f"mask + advance per token, llguidance against {name} (ratio: their time / "
            f"llguidance's, median of {len(rounds)} rounds, {min(ratios):.2f}-{max(ratios):.2f})",
            f"{ours:.1f} µs", f"{med(name, 'us_per_token'):.1f} µs", statistics.median(ratios),
        ))  # fmt: skip
    for name in ENGINES:
        refused = max(r[name]["refused"] for r in rounds)
        rows.append(row(
            f"{name}: tokenizer setup / schema compile; valid documents refused (of {DOCUMENTS})",
            f"{med(name, 'setup_s'):.3f} s / {med(name, 'compile_s'):.3f} s; {refused}",
            "", None,
        ))  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
