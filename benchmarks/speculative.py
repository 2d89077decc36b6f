"""Speculative decoding against plain decoding, in one run: output tok/s with and without it,
acceptance rate and mean accepted length.

Models (2 threads, CPU):
- small-llama in bfloat16 (random init, made under --workdir once), the speed target's
  model. Its draft model for `--speculative PATH` is its own first DRAFT_LAYERS layers
  with its embeddings and head (written under --workdir): the only draft with its
  vocabulary there is. --draft-min-confidence keeps its default (measured: a draft ends
  where the chance that all its tokens are accepted falls below the draft model's step
  time over the model's).
- stories260K (../shared, trained), as the model that might repeat its prompt; ngram only.
  It does not reproduce tinyshakespeare (its lookups miss), so its rows carry no target:
  they show what speculating costs where drafts fail, on a model whose step is mostly
  fixed cost. small-llama's greedy output, a random-init model's, soon repeats one token
  over and over, which its own lookups then predict: its ngram rows measure the machinery
  on drafts that are right, not a model reproducing its input.
- small-llama widened (SMALL_1B, written under --workdir): small-llama with zero rows and
  columns as WIDE below (hidden x 4, intermediate x 4, KV heads repeated: some 1.2B
  parameters in bfloat16, 12 layers of hidden 3072), a step of a model of Llama-3.2-1B's
  size whose greedy output is small-llama's (tests/test_widen.py: the same logits): ngram
  on both workloads at concurrency 1, where a step reads its weights from memory, as a
  large model's does; the ngram target holds there too.
- stories260K widened (WIDE, written under --workdir): stories260K with zero rows and
  columns that leave its function as it is, with some 300 times its parameters, run in
  bfloat16: a step costs what one of a model of about 85M parameters costs. Its draft
  model is stories260K itself (float32): the same predictions up to rounding at a fraction
  of the step's cost, the case a draft model is for (a small model that agrees with a
  large one), made from the only trained model there is; the draft target is WIDE's rows.
  Beside it, two drafts that agree with it less: stories260K quantized by llmkit to 4 bits
  (RTN, one scale per output channel; from stories260K-pad176, its MLP zero-padded for the
  4-bit packing: the same function), the draft a user would make of a small model, right
  most of the time; and stories260K's first WEAK_LAYERS layers, right less than half the
  time.

Workloads, 64 tokens per request (EOS ignored), greedy but for `sampled`:
- grounded: a passage of tinyshakespeare, then "Again:" and the passage's first words
  (the output should reproduce the passage: edit/summarize style);
- free: a line of tinyshakespeare to continue;
- grounded-long (concurrency 1: small-llama plainly and with ngram, beside llama.cpp's
  prompt lookup): grounded's form on a passage of LONG_CHARS characters, some 1,850 tokens
  (with the 64 generated, within small-llama's 2,048 positions): the document lengths
  prompt lookup serves, where each verifying step's queries attend over a long context. No
  target;
- json (concurrency 1: small-llama with ngram, WIDE with stories260K and its 4-bit copy as
  drafts): free's prompts answered as structured output under
  benchmarks/structured_outputs.py's SCHEMA (a title and 3 to 6 records), greedy, ending
  where the answer does (at most GUIDED_MAX_TOKENS): keys that repeat from record to
  record, which lookups predict, drafts cut where the guide stops allowing them; a draft
  model chooses its tokens among those the guide allows. Plain runs ask for no
  speculation (`speculative: false`); `forced` is the plain engine without that, whose
  guided requests verify the tokens the guide forces as drafts, as every engine's do. No
  target; it shows what speculation does for guided requests.
- sampled (concurrency 1: WIDE with stories260K and its 4-bit copy as drafts): free's
  prompts drawn at temperature SAMPLED_TEMPERATURE, unseeded, as a chat client asks: the
  draft model draws its tokens from its own distribution, and rejection sampling tests
  them against the model's. The draft target applies (the same request, sampled).

Measures: at concurrency 1, decode tok/s (the tokens after the first over the time after the
first: 1 / TPOT, as `bench offline` and benchmarks/cpu_decode.py count it; the prompt's
prefill is the same work with and without speculation), with end-to-end tok/s beside it; at
higher concurrency, end-to-end tok/s. A concurrency-1 row also gives the share of its output
accepted from drafts (the proposer's, and the tokens a guide forces): the rest took a
model step a token, as plain decoding's do, so a speed-up past 1 / (1 - share) would come
from something other than speculation. Each run also counts its engine steps (a call that
runs several decode steps ahead counts once; in the JSON and each round's line, beside
plain's): where two engines add the same tokens in very different numbers of calls, their
calls, not their drafts, set the difference.

Anchors (CPU, where llama.cpp is set up: `bash benchmarks/setup_reference_venvs.sh
llamacpp`), on the concurrency-1 grounded, grounded-long and free prompts (grounded-long:
the ngram row's alone), each run right after llmkit's in the same round,
llama-speculative-simple, greedy, K tokens a draft, THREADS threads:
- for the draft rows, llama.cpp's speculative decoding of the same pair, WIDE (a bf16 GGUF)
  with stories260K (f32) as its draft (draft-simple, which drafts K every round);
- for the ngram rows, llama.cpp's prompt lookup on small-llama (a bf16 GGUF): ngram-map-k
  with keys of LOOKUP_KEY tokens, of its n-gram drafters (ngram-simple, ngram-map-k,
  ngram-map-k4v, ngram-cache, ngram-mod; keys of 1 to 3 tokens) the fastest on these
  prompts when it was chosen. Its greedy output is its own (its products round otherwise),
  so what it repeats, and its acceptance, may differ from llmkit's.
Each one's decode tok/s against llmkit's row; llama-bench's plain decoding of the model
after as many tokens of context gives llama.cpp's own speed-up, shown beside llmkit's. No
target: where llmkit's speculation stands against the strongest CPU engine's on the same
models.

Each round runs, in an order that alternates between rounds, plainly and with speculation:
every proposer on each workload at concurrency 1, 8 and 64 (small-llama; SMALL_1B and
stories260K with ngram at 1), and small-llama's ngram with no --speculative-max-seqs limit
at concurrency 2, 4 and 8: where speculation stops paying, which sets that option's default;
and the widened stories260K plainly and with each of its drafts at concurrency 1. Ratios are
per round, then the median. Targets (issue 40): ngram >= 1.8x at concurrency 1 on grounded
(small-llama and SMALL_1B); draft >= 1.3x at concurrency 1 for each of WIDE's drafts whose
acceptance is >= 0.6 (over at least MIN_DRAFTS drafts a round: fewer, and the engine's draft
cutoff has all but stopped drafting, so the few tokens drafted give no rate to speak of);
>= 0.95x at concurrency 64 for every proposer and workload (small-llama). A concurrency-1 row
faster than its drafts can make it (`explained`: a token accepted from a draft saves one
step of plain decoding at most) by more than EXPLAINED_SLACK says so, and its target is not
met: there the plain run was slow, not the speculation fast. Writes
benchmarks/results/speculative-<date>.json.

With --device cuda (a GPU machine), instead: Llama-3.2-1B's shapes (random init, bf16, made
on the GPU under --workdir) plainly, with ngram and with its own first DRAFT_LAYERS layers
as the draft, on both workloads (as token ids, one a byte of the text: a random-init model
has no tokenizer to speak of) at concurrency 1, 8 and 64, after an untimed round of every
case (an engine captures a CUDA graph on a batch size's first step: a workload whose prompts
take several prefill steps ends in steps of fewer sequences, and an engine that speculates
verifies in steps of other sizes), CUDA_OUTPUT_LEN tokens a request (so a request
at concurrency 1 takes about a second); the concurrency-64 target on its rows, and the
draft's where its acceptance is >= 0.6. How much of its greedy output repeats itself, so
that ngram drafts it, depends on its weights: the share of the output accepted from drafts,
in each row, says how much speculation did, and its ngram rows carry no target. The ngram
target is measured on SMALL_1B instead (as on the CPU, plainly and with ngram at concurrency
1 on both workloads, CUDA_OUTPUT_LEN tokens a request), whose output repeats itself, so that
its drafts are right. A random-init draft model doubts every token, so the draft target is
measured on WIDE_CUDA: stories260K widened as WIDE is, further (hidden x 64, intermediate x
128: some 1.4B parameters, written in bfloat16), a step of a model of Llama-3.2-1B's size,
plainly and with stories260K as its draft, on both workloads (as text), json and sampled at
concurrency 1, WIDE_CUDA_OUTPUT_LEN tokens a request (stories260K's context is 512 tokens);
and the 1B shapes' ngram with no --speculative-max-seqs limit at concurrency 8 (CUDA_SWEEP),
where a GPU's step is still bandwidth-bound: whether that default holds there too. Writes
benchmarks/results/speculative-cuda-<date>.json.

--concurrency-1-only runs the concurrency-1 cases alone (those of the ngram and draft
targets; no sweep): a short run that can afford the rounds a spread needs where device time
is scarce. Its result is a variant of its own (speculative[-cuda]-c1-<date>.json), beside
the full run's, whose table it does not replace.

    python benchmarks/speculative.py [--workdir DIR] [--rounds 3] [--device cuda]
        [--concurrency-1-only]
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import statistics
import time
from dataclasses import replace
from pathlib import Path

import llamacpp
from report import row, save_result, workdir

SHARED = Path(__file__).resolve().parents[2] / "shared"
THREADS = 2
OUTPUT_LEN = 64
CUDA_OUTPUT_LEN = 512  # a GPU decodes far faster: longer requests, timings above the noise
WIDE_CUDA_OUTPUT_LEN = 112  # the longest grounded prompt (393 tokens) and this fit in 512
CONCURRENCY = (1, 8, 64)  # on CUDA too
LLAMA_1B = "llama-1b"  # the --device cuda target (benchmarks/shard.py's LLAMA_1B shapes)
SWEEP = (2, 4, 8)  # concurrencies of the run without the --speculative-max-seqs limit
# the same on CUDA, where a step of 8 sequences is still bandwidth-bound
CUDA_SWEEP = (8,)
UNLIMITED = "ngram-unlimited"
DRAFT_LAYERS = 2
GUIDED = "json"  # the structured-output workload
LONG = "grounded-long"  # grounded on a long passage (small-llama, concurrency 1)
LONG_CHARS = 2900  # its passage: with "Again:" and OUTPUT_LEN tokens, within 2,048 positions
SAMPLED = "sampled"  # free's prompts, sampled (unseeded) at SAMPLED_TEMPERATURE
SAMPLED_TEMPERATURE = 0.8
FORCED = "forced"  # on it, the plain engine verifying the tokens guides force as drafts
GUIDED_MAX_TOKENS = 512  # structured_outputs.SCHEMA's answers end well within it
K = 4
# a concurrency-1 row faster than `explained` by more than this (its rounds' median against
# the share accepted over all of them) is not speculation's doing: its target is not met
EXPLAINED_SLACK = 1.1
MIN_DRAFTS = 4  # drafts a round (on average) from which a row's acceptance counts for a target
# stories260K widened into a target a draft can pay off against (widen.py): hidden x 16 (a
# power of 4, so the norms' rescaling is exact), intermediate x 32, KV heads repeated:
# some 85M parameters
HIDDEN_FACTOR, MLP_FACTOR = 16, 32
WIDE = "stories260K-wide"
WEAK_LAYERS = 4  # the weaker draft of WIDE: stories260K's first layers
WIDE_WEAK = f"draft-{WEAK_LAYERS}-layers"
WIDE_Q4 = "draft-int4"  # WIDE's quantized draft
WIDE_CUDA = "stories260K-1b"  # the --device cuda draft model's target
SMALL_1B = "small-llama-1b"  # small-llama widened to some 1.2B parameters
LLAMACPP = "llama.cpp"  # the anchor: its speculative decoding of WIDE, its prompt lookup
LOOKUP_KEY = 2  # tokens in a key of llama.cpp's prompt lookup (the ngram rows' anchor)
# per anchored model: the llmkit row its anchor stands beside, and what that anchor is
ANCHORED = {
    WIDE: ("draft", "speculative decoding of the same models and prompt "
                    "(llama-speculative-simple, draft-simple"),
    "small-llama": ("ngram", "prompt lookup on the same model and prompt "
                             f"(llama-speculative-simple, ngram-map-k, {LOOKUP_KEY}-token keys"),
}  # fmt: skip
CUDA_HIDDEN_FACTOR, CUDA_MLP_FACTOR = 64, 128
SMALL_1B_FACTORS = (4, 4)  # SMALL_1B's hidden and intermediate over small-llama's


def small_llama(work: Path) -> Path:
    """small-llama in bfloat16 under `work` (made once)."""
    from llmkit.checkpoint.init import init_checkpoint

    small = work / "small-llama-bf16"
    if not (small / "config.json").is_file():
        init_checkpoint(small, "small-llama", 0, "bfloat16", True)
    return small


def small_1b(work: Path) -> Path:
    """SMALL_1B under `work` (made once)."""
    return widened(small_llama(work), work / SMALL_1B, *SMALL_1B_FACTORS)


def make_models(work: Path, shared: Path) -> dict[str, Path]:
    small = small_llama(work)
    stories = shared / "models" / "stories260K"
    return {
        "small-llama": small,
        SMALL_1B: small_1b(work),
        "draft": first_layers(small, work / f"small-llama-{DRAFT_LAYERS}-layers", DRAFT_LAYERS),
        "stories260K": stories,
        WIDE: widened(stories, work / WIDE, HIDDEN_FACTOR, MLP_FACTOR),
        WIDE_WEAK: first_layers(stories, work / f"stories260K-{WEAK_LAYERS}-layers", WEAK_LAYERS),
        WIDE_Q4: quantized(shared / "models" / "stories260K-pad176", work / "stories260K-int4"),
    }


def make_cuda_models(work: Path, shared: Path) -> dict[str, Path]:
    import torch
    from shard import LLAMA_1B as SHAPES
    from shard import make_random

    target = work / LLAMA_1B
    if not (target / "config.json").is_file():
        make_random(target, SHAPES, device="cuda")
    draft = first_layers(target, work / f"{LLAMA_1B}-{DRAFT_LAYERS}-layers", DRAFT_LAYERS)
    models = {LLAMA_1B: target, "draft": draft, SMALL_1B: small_1b(work)}
    stories = shared / "models" / "stories260K"
    if not (stories / "config.json").is_file():
        print(f"{WIDE_CUDA} skipped: no {stories}", flush=True)
        return models
    wide = widened(stories, work / WIDE_CUDA, CUDA_HIDDEN_FACTOR, CUDA_MLP_FACTOR,
                   torch.bfloat16)  # fmt: skip
    return {**models, WIDE_CUDA: wide, "stories260K": stories}


def quantized(model: Path, out: Path) -> Path:
    """`model` quantized as WIDE_Q4 is (made once)."""
    from llmkit.quant.options import options_for
    from llmkit.quant.pipeline import quantize

    if not (out / "config.json").is_file():
        quantize(model, out, "rtn", options=options_for("rtn", group_size=-1))
    return out


def widened(model: Path, out: Path, hidden_factor: int, mlp_factor: int, dtype=None) -> Path:
    """`model` widened by these factors (WIDE, WIDE_CUDA, SMALL_1B; made once)."""
    from widen import widen

    if not (out / "config.json").is_file():
        inter = json.loads((model / "config.json").read_text())["intermediate_size"]
        widen(model, out, inter * mlp_factor, hidden_factor, dtype)
    return out


def first_layers(model: Path, out: Path, layers: int) -> Path:
    """A checkpoint of `model`'s first `layers` decoder layers, embeddings, norm and head."""
    from safetensors.torch import load_file, save_file

    if (out / "model.safetensors").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((model / "config.json").read_text())
    config["num_hidden_layers"] = layers
    (out / "config.json").write_text(json.dumps(config))
    tensors = load_file(model / "model.safetensors")
    kept = {
        name: t
        for name, t in tensors.items()
        if not name.startswith("model.layers.") or int(name.split(".")[2]) < layers
    }
    save_file(kept, out / "model.safetensors", metadata={"format": "pt"})
    for f in model.iterdir():
        if f.name.startswith("tokenizer") or f.name == "generation_config.json":
            shutil.copy(f, out / f.name)
    return out


def workloads(shared: Path, as_ids: bool = False) -> dict[str, list]:
    """The prompts of each workload as text, or `as_ids` as token ids (each byte + 3)."""
    text = shakespeare(shared)
    passages = [text[i * 700 : i * 700 + 500] for i in range(max(CONCURRENCY))]
    prompts = {
        "grounded": [grounded(p) for p in passages],
        "free": [p[:80] for p in passages],
    }
    if as_ids:
        return {w: [[b + 3 for b in p.encode()] for p in ps] for w, ps in prompts.items()}
    return prompts


def grounded(passage: str) -> str:
    """The grounded workloads' prompt: `passage`, then "Again:" and its first words."""
    return f"{passage}\n\nAgain:\n{passage[:60]}"


def long_grounded(shared: Path) -> list[str]:
    """LONG's prompt: grounded's form on tinyshakespeare's first LONG_CHARS characters."""
    return [grounded(shakespeare(shared)[:LONG_CHARS])]


def shakespeare(shared: Path) -> str:
    """The workloads' text: tinyshakespeare, from `shared`'s data folder."""
    return (shared / "data" / "tinyshakespeare.txt").read_text()


def run(
    llm, prompts: list[str], output_len: int = OUTPUT_LEN, workload: str = "", plainly=False
) -> dict:
    """`prompts` decoded greedily, `output_len` tokens each (EOS ignored); as SAMPLED, drawn
    at SAMPLED_TEMPERATURE (no seed: drafts go through rejection sampling); or as GUIDED,
    each answered under structured_outputs.SCHEMA, ending where its answer does
    (`plainly`: as requests that ask for no speculation, not even of the tokens their
    guide forces)."""
    from structured_outputs import SCHEMA

    from llmkit.runtime.guide import Guide
    from llmkit.runtime.sequence import SamplingParams

    if workload == GUIDED:
        guide = Guide("json", json.dumps(SCHEMA))
        params = SamplingParams(max_tokens=GUIDED_MAX_TOKENS, temperature=0.0, guide=guide,
                                speculative=not plainly)  # fmt: skip
    else:
        temperature = SAMPLED_TEMPERATURE if workload == SAMPLED else 0.0
        params = SamplingParams(max_tokens=output_len, temperature=temperature, ignore_eos=True)
    before = replace(llm.engine.spec_stats)
    steps = itertools.count()  # the engine steps the output took
    start = time.perf_counter()
    outs = llm.generate(prompts, params, on_step=lambda _: next(steps))
    seconds = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    spec = llm.engine.spec_stats.since(before)
    decoding = max(o.times.finished for o in outs) - min(o.times.first_token for o in outs)
    return {
        "tok_s": tokens / seconds,
        "decode_tok_s": (tokens - len(outs)) / decoding,
        "output_tokens": tokens,
        "engine_steps": next(steps),
        "forced": spec.forced,
        "proposed": spec.proposed,
        "accepted": spec.accepted,
        "drafts": spec.drafts,
        "by_position": spec.acceptance_by_position,
        "cutoff": llm.engine.draft_cutoff(),  # a draft model's, at the end
        "tokens": [o.outputs[0].token_ids for o in outs],
    }


def speculating(model: Path, speculative: str | None, limit: int, **config):
    """An engine of `model` proposing K tokens with `speculative` (None: plainly) for up to
    `limit` decoding sequences, with the other EngineConfig fields `config`."""
    from llmkit.runtime.engine import LLM, EngineConfig

    return LLM(model, EngineConfig(speculative=speculative, num_speculative_tokens=K,
                                   speculative_max_seqs=limit, **config))  # fmt: skip


def engines(
    models: dict[str, Path], speculative_max_seqs: int, sweep: tuple[int, ...]
) -> dict[str, object]:
    def llm(model: str, speculative: str | None = None, limit: int = speculative_max_seqs):
        dtype = "bfloat16" if model == WIDE else "auto"
        return speculating(models[model], speculative, limit, threads=THREADS,
                           max_num_seqs=max(CONCURRENCY), dtype=dtype)  # fmt: skip

    llms = {
        "small-llama plain": llm("small-llama"),
        "small-llama ngram": llm("small-llama", "ngram"),
        "small-llama draft": llm("small-llama", str(models["draft"])),
        f"{SMALL_1B} plain": llm(SMALL_1B),
        f"{SMALL_1B} ngram": llm(SMALL_1B, "ngram"),
        "stories260K plain": llm("stories260K"),
        "stories260K ngram": llm("stories260K", "ngram"),
        f"{WIDE} plain": llm(WIDE),
        f"{WIDE} draft": llm(WIDE, str(models["stories260K"])),
        f"{WIDE} {WIDE_WEAK}": llm(WIDE, str(models[WIDE_WEAK])),
        f"{WIDE} {WIDE_Q4}": llm(WIDE, str(models[WIDE_Q4])),
    }
    if sweep:
        llms[f"small-llama {UNLIMITED}"] = llm("small-llama", "ngram", max(sweep))
    return llms


def cuda_engines(
    models: dict[str, Path], speculative_max_seqs: int, sweep: tuple[int, ...]
) -> dict[str, object]:
    def llm(model: str = LLAMA_1B, speculative: str | None = None, limit=speculative_max_seqs):
        # eight engines share the GPU: each gets its own KV cache size, not a share of it
        return speculating(models[model], speculative, limit, device="cuda",
                           dtype="bfloat16", max_num_seqs=max(CONCURRENCY),
                           max_model_len=4096 if model == LLAMA_1B else None,
                           kv_cache_memory=(6 if model == LLAMA_1B else 1) * 2**30)  # fmt: skip

    engines = {
        f"{LLAMA_1B} plain": llm(),
        f"{LLAMA_1B} ngram": llm(speculative="ngram"),
        f"{LLAMA_1B} draft": llm(speculative=str(models["draft"])),
        f"{SMALL_1B} plain": llm(SMALL_1B),
        f"{SMALL_1B} ngram": llm(SMALL_1B, "ngram"),
    }
    if sweep:
        engines[f"{LLAMA_1B} {UNLIMITED}"] = llm(speculative="ngram", limit=max(sweep))
    if WIDE_CUDA in models:  # the rest of the run goes on where these cannot load here
        try:
            engines[f"{WIDE_CUDA} plain"] = llm(WIDE_CUDA)
            engines[f"{WIDE_CUDA} draft"] = llm(WIDE_CUDA, str(models["stories260K"]))
        except Exception as e:
            print(f"{WIDE_CUDA} skipped: {e}", flush=True)
            for name in [n for n in engines if n.startswith(WIDE_CUDA)]:
                engines.pop(name).close()
    return engines


def main() -> None:
    args = parse_args()
    work = workdir(args, "llmkit-spec-")
    cuda = args.device == "cuda"
    concurrencies = (1,) if args.concurrency_1_only else CONCURRENCY
    sweep = () if args.concurrency_1_only else CUDA_SWEEP if cuda else SWEEP
    texts = workloads(args.shared)
    # (prompts by workload, tokens a request) per model
    setting = {model: (texts, OUTPUT_LEN)
               for model in ("small-llama", SMALL_1B, "stories260K", WIDE)}  # fmt: skip
    if cuda:
        llms = cuda_engines(make_cuda_models(work, args.shared), args.speculative_max_seqs, sweep)
        setting = {LLAMA_1B: (workloads(args.shared, as_ids=True), CUDA_OUTPUT_LEN),
                   WIDE_CUDA: (texts, WIDE_CUDA_OUTPUT_LEN)}  # fmt: skip

        cases = [(LLAMA_1B, w, c, _proposers(c, sweep)) for w in texts
                 for c in concurrencies]  # fmt: skip
        cases += [(SMALL_1B, w, 1, ("plain", "ngram")) for w in texts]
        setting[SMALL_1B] = (texts, CUDA_OUTPUT_LEN)
        if f"{WIDE_CUDA} draft" in llms:
            cases += [(WIDE_CUDA, w, 1, ("plain", "draft")) for w in texts]
            cases += [(WIDE_CUDA, GUIDED, 1, ("plain", FORCED, "draft"))]
            cases += [(WIDE_CUDA, SAMPLED, 1, ("plain", "draft"))]
            setting[WIDE_CUDA] = (_with_free(texts), WIDE_CUDA_OUTPUT_LEN)
        anchor = None
    else:
        models = make_models(work, args.shared)
        llms = engines(models, args.speculative_max_seqs, sweep)
        anchor = llamacpp_models(work, models)
        cases = [("small-llama", w, c, _proposers(c, sweep)) for w in texts
                 for c in concurrencies]  # fmt: skip
        cases += [("small-llama", GUIDED, 1, ("plain", FORCED, "ngram"))]
        cases += [("small-llama", LONG, 1, ("plain", "ngram"))]
        setting["small-llama"] = ({**_with_free(texts), LONG: long_grounded(args.shared)},
                                  OUTPUT_LEN)  # fmt: skip
        cases += [(SMALL_1B, w, 1, ("plain", "ngram")) for w in texts]
        cases += [("stories260K", w, 1, ("plain", "ngram")) for w in texts]
        cases += [(WIDE, w, 1, ("plain", "draft", WIDE_Q4, WIDE_WEAK)) for w in texts]
        cases += [(WIDE, GUIDED, 1, ("plain", FORCED, "draft", WIDE_Q4))]
        cases += [(WIDE, SAMPLED, 1, ("plain", "draft", WIDE_Q4))]
        setting[WIDE] = (_with_free(texts), OUTPUT_LEN)
        alone = [c for c in sweep if c not in concurrencies]
        cases += [("small-llama", w, c, ("plain", UNLIMITED)) for w in texts for c in alone]
    if cuda:  # every CUDA graph captured before any timing
        play(llms, cases, setting)
    else:
        for name, llm in llms.items():  # warm up every engine
            loads, output_len = setting[name.split()[0]]
            run(llm, loads["free"][:2], output_len)
    rounds = [play(llms, cases, setting, r, anchor) for r in range(args.rounds)]
    for llm in llms.values():
        llm.close()
    report(rounds, args.speculative_max_seqs, cuda, args.concurrency_1_only)


def play(llms: dict, cases: list, setting: dict, r: int | None = None, anchor=None) -> dict:
    """Round `r` (None: an untimed one, quiet) of every case: each mode of a case run back
    to back with the others (their order alternating between rounds), then llama.cpp's
    anchor run where `anchor` has the case's model -> the runs by "model mode workload
    concurrency"."""
    result = {}
    for model, workload, concurrency, proposers in cases:
        loads, output_len = setting[model]
        modes = [f"{model} {p}" for p in proposers]
        for name in modes if r is None or r % 2 == 0 else reversed(modes):
            engine = llms[name.replace(f" {FORCED}", " plain")]
            out = run(engine, loads[workload][:concurrency], output_len, workload,
                      name.endswith(" plain"))  # fmt: skip
            result[f"{name} {workload} {concurrency}"] = out
        plain = result[f"{model} plain {workload} {concurrency}"]
        for name in modes[1:]:
            out = result[f"{name} {workload} {concurrency}"]
            same = out.pop("tokens") == plain["tokens"]
            out["same_tokens"] = same if workload != SAMPLED else None  # drawn apart
            if r is not None:
                print(
                    f"round {r + 1} {name:18} {workload:8} c{concurrency:<3} "
                    f"{out['tok_s']:7.1f} tok/s vs {plain['tok_s']:7.1f} plain "
                    f"({out['tok_s'] / plain['tok_s']:.2f}x; decode "
                    f"{out['decode_tok_s'] / plain['decode_tok_s']:.2f}x), accepted "
                    f"{out['accepted']}/{out['proposed']}, engine steps {out['engine_steps']} "
                    f"vs {plain['engine_steps']} plain",
                    flush=True,
                )
        plain.pop("tokens", None)
        if anchor and model in anchor and concurrency == 1 and workload not in (GUIDED, SAMPLED):
            gguf, spec = anchor[model]  # back to back with llmkit's
            prompt = loads[workload][0]
            result[f"{model} {LLAMACPP} {workload} 1"] = llamacpp_case(gguf, prompt, spec)
    return result


def _with_free(texts: dict[str, list]) -> dict[str, list]:
    """The workloads, with GUIDED and SAMPLED on free's prompts."""
    return {**texts, GUIDED: texts["free"], SAMPLED: texts["free"]}


def llamacpp_models(work: Path, models: dict[str, Path]) -> dict[str, tuple] | None:
    """Per anchored model (ANCHORED): its GGUF file (made once) and how llama.cpp drafts for
    it, WIDE with stories260K as its draft, small-llama by prompt lookup; None, with a note,
    where llama.cpp is not set up."""
    if not (llamacpp.LLAMACPP / "build" / "bin" / "llama-speculative-simple").exists():
        print("llama.cpp: skipped (bash benchmarks/setup_reference_venvs.sh llamacpp)")
        return None
    draft = llamacpp.to_gguf(models["stories260K"], work / "stories260K.gguf", "f32")
    return {
        WIDE: (llamacpp.to_gguf(models[WIDE], work / "wide.gguf", "bf16"),
               llamacpp.draft_spec(draft, K, THREADS)),
        "small-llama": (llamacpp.to_gguf(models["small-llama"], work / "small-llama.gguf",
                                         "bf16"), llamacpp.lookup_spec(LOOKUP_KEY, K)),
    }  # fmt: skip


def llamacpp_case(target: Path, prompt: str, spec: list) -> dict:
    """llama.cpp's speculative decoding of `prompt` on `target`, drafted as `spec` says (K
    tokens a draft), and its plain decoding after as many tokens of context (llama-bench)."""
    out = llamacpp.speculative(target, prompt, OUTPUT_LEN, THREADS, spec)
    out["plain_tok_s"] = llamacpp.plain_tok_s(target, OUTPUT_LEN, out["prompt_tokens"], THREADS)
    print(f"  llama.cpp {out['decode_tok_s']:7.1f} tok/s speculating, {out['plain_tok_s']:7.1f} "
          f"plain, accepted {out['accepted']}/{out['proposed']}", flush=True)  # fmt: skip
    return out


def _proposers(concurrency: int, sweep: tuple[int, ...]) -> tuple[str, ...]:
    """What runs at a concurrency: plainly, ngram and draft, and ngram without the limit where
    the sweep has it (beside the others: one plain run, one key)."""
    return ("plain", "ngram", "draft") + ((UNLIMITED,) if concurrency in sweep else ())


def report(rounds: list[dict], speculative_max_seqs: int, cuda: bool, only_1: bool) -> None:
    fields = {"rounds": rounds, "k": K, "speculative_max_seqs": speculative_max_seqs}
    rows = summarize(fields, cuda)
    for line in rows:
        print(f"{line['measured']}: {line['ratio']:.2f}x {line['target']}")
    if cuda:
        import torch

        where = f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    else:
        where = f"{THREADS} threads"
    save_result(
        "speculative",
        fields,
        f"{where}, k={K}, --speculative-max-seqs {speculative_max_seqs}",
        anchor="the same engine without speculation, same process"
        + ("; llama.cpp's speculative decoding where a row says so" if _anchored(rounds) else ""),
        summary=rows,
        variant="-".join(["cuda"] * cuda + ["c1"] * only_1),
    )


def _anchored(rounds: list[dict]) -> bool:
    return any(LLAMACPP in key for key in rounds[0])


def summarize(fields: dict, cuda: bool = False) -> list[dict]:
    """One row per proposer and workload at concurrency 1; one per proposer at each higher
    concurrency run (its worse workload; the largest one's with its target); one per
    concurrency of the unlimited sweep, where it ran."""
    rounds = fields["rounds"]
    runs = [key.split() for key in rounds[0] if key.split()[1] not in ("plain", LLAMACPP)]
    ran = {(run[1], int(run[3])) for run in runs}
    rows = [_row(rounds, *run) for run in runs if run[3] == "1" and run[1] != UNLIMITED]
    rows += [_anchor_row(rounds, *key.split()[::2]) for key in rounds[0] if LLAMACPP in key]
    model = LLAMA_1B if cuda else "small-llama"
    for concurrency in CONCURRENCY[1:]:
        floor = 0.95 if concurrency == max(CONCURRENCY) else None
        for proposer in ("ngram", "draft"):
            if (proposer, concurrency) in ran:
                label = f"{model} {proposer}"
                rows.append(_worse(rounds, runs, proposer, concurrency, label, floor))
    for concurrency in CUDA_SWEEP if cuda else SWEEP:
        if (UNLIMITED, concurrency) in ran:
            label = f"{model} ngram without the --speculative-max-seqs limit"
            rows.append(_worse(rounds, runs, UNLIMITED, concurrency, label))
    return rows


def _worse(rounds, runs, proposer: str, concurrency: int, label: str, floor=None) -> dict:
    """One row for a proposer at a concurrency over every workload: each one's median
    ratio, the worse one's numbers (checked against `floor` when there is one)."""
    at = [_stats(rounds, *run) for run in runs if run[1:4:2] == [proposer, str(concurrency)]]
    worst = min(at, key=lambda r: r["ratio"])
    shown = ", ".join(f"{r['workload']} {r['ratio']:.2f}x" for r in at)
    return row(
        f"{label}, concurrency {concurrency}: {shown} (the worse shown; rounds "
        f"{min(r['low'] for r in at):.2f}-{max(r['high'] for r in at):.2f})",
        worst["tok_s"], worst["plain"], worst["ratio"],
        "" if floor is None else f"≥ {floor}×", None if floor is None else worst["ratio"] >= floor,
    )  # fmt: skip


def _stats(rounds: list[dict], model: str, proposer: str, workload: str, concurrency: str):
    """Medians and spread of one run over the rounds, beside its plain run: decode tok/s at
    concurrency 1 (with the end-to-end ratio as `whole`), end-to-end tok/s above it."""
    med = statistics.median
    key, plain = (f"{model} {m} {workload} {concurrency}" for m in (proposer, "plain"))
    measure = "decode_tok_s" if concurrency == "1" else "tok_s"
    ratios = [r[key][measure] / r[plain][measure] for r in rounds]
    proposed = sum(r[key]["proposed"] for r in rounds)
    drafts = sum(r[key]["drafts"] for r in rounds)
    accepted = sum(r[key]["accepted"] for r in rounds)
    return {
        "workload": workload,
        "ratio": med(ratios),
        "low": min(ratios),
        "high": max(ratios),
        "whole": med(r[key]["tok_s"] / r[plain]["tok_s"] for r in rounds),
        "tok_s": f"{med(r[key][measure] for r in rounds):.1f} tok/s",
        "plain": f"{med(r[plain][measure] for r in rounds):.1f} tok/s",
        "acceptance": accepted / proposed if proposed else 0.0,
        "per_draft": accepted / drafts if drafts else 0.0,
        "drafts": drafts,
        # the share of the output accepted from drafts (the proposer's and a guide's)
        "accepted_share": (accepted + sum(r[key]["forced"] for r in rounds))
        / sum(r[key]["output_tokens"] for r in rounds),
        "cutoffs": [r[key]["cutoff"] for r in rounds if r[key].get("cutoff") is not None],
        "same": all(r[key]["same_tokens"] is not False for r in rounds),
    }


def _row(rounds: list[dict], model: str, proposer: str, workload: str, concurrency: str):
    st = _stats(rounds, model, proposer, workload, concurrency)
    measured = st["drafts"] >= MIN_DRAFTS * len(rounds)
    target, met = _target(
        model, proposer, workload, int(concurrency), st["acceptance"] if measured else None,
        st["ratio"],
    )  # fmt: skip
    unexplained, most = "", explained(st["accepted_share"])
    if concurrency == "1" and st["ratio"] > EXPLAINED_SLACK * most:
        # faster than drafts can make it: the plain run was slow, and the target says nothing
        unexplained = f", more than its drafts explain (at most {most:.2f}x)"
        met = False if met else met
    cutoffs = st["cutoffs"]
    cut = f", draft cutoff {min(cutoffs):.2f}-{max(cutoffs):.2f}" if cutoffs else ""
    share = st["accepted_share"]
    share = f", {share:.0%} of the output accepted from drafts" if share else ""
    return row(
        f"{model} {proposer}, {workload}, concurrency {concurrency}, decode tok/s: acceptance "
        f"{st['acceptance']:.2f}, {st['per_draft']:.2f} accepted per draft{cut}{share}"
        f"{'' if st['same'] else ', greedy tokens differ from plain'}{unexplained} "
        f"(rounds {st['low']:.2f}-{st['high']:.2f}; end to end with the prefill "
        f"{st['whole']:.2f}x)",
        st["tok_s"], st["plain"], st["ratio"], target, met,
    )  # fmt: skip


def explained(share: float) -> float:
    """The most a speed-up of decoding can be where `share` of the output was accepted from
    drafts: a token accepted from a draft saves a step of plain decoding at most, and every
    other token costs one (a verifying step at least as much as a plain one), so the steps
    left are 1 - share of plain decoding's."""
    return 1 / (1 - share) if share < 1 else float("inf")


def _anchor_row(rounds: list[dict], model: str, workload: str) -> dict:
    """`model`'s ANCHORED row against llama.cpp's speculative decoding of the same model
    and prompt (WIDE: with the same draft; small-llama: by prompt lookup), round by round;
    each engine's own speed-up over its plain decoding beside it."""
    med = statistics.median
    proposer, how = ANCHORED[model]
    ours, plain = (f"{model} {m} {workload} 1" for m in (proposer, "plain"))
    theirs = f"{model} {LLAMACPP} {workload} 1"
    ratios = [r[ours]["decode_tok_s"] / r[theirs]["decode_tok_s"] for r in rounds]
    accepted, proposed = (sum(r[theirs][n] for r in rounds) for n in ("accepted", "proposed"))
    own = med(r[ours]["decode_tok_s"] / r[plain]["decode_tok_s"] for r in rounds)
    their_own = med(r[theirs]["decode_tok_s"] / r[theirs]["plain_tok_s"] for r in rounds)
    return row(
        f"{model} {proposer}, {workload}, concurrency 1, decode tok/s, against llama.cpp's "
        f"{how}, {K} tokens a draft; its acceptance {accepted / max(proposed, 1):.2f}; "
        f"over its own plain decoding {their_own:.2f}x, llmkit's {own:.2f}x; rounds "
        f"{min(ratios):.2f}-{max(ratios):.2f})",
        f"{med(r[ours]['decode_tok_s'] for r in rounds):.1f} tok/s",
        f"{med(r[theirs]['decode_tok_s'] for r in rounds):.1f} tok/s",
        med(ratios), "", None,
    )  # fmt: skip


def _target(
    model: str, proposer: str, workload: str, concurrency: int, acceptance: float | None, ratio
):
    """The issue's targets: ngram's on small-llama and its widened copy SMALL_1B (of the 1B
    shapes' size; on CUDA SMALL_1B's alone), whose output repeats itself; concurrency 64's
    on small-llama (on CUDA the 1B shapes); the draft model's on the widened stories260K
    (WIDE, WIDE_CUDA), where a draft can be right, and on the 1B shapes (stories260K's own
    rows show the cost of speculating where lookups miss: it does not reproduce
    tinyshakespeare). `acceptance` None: fewer than MIN_DRAFTS drafts a round, no rate."""
    drafted = model in (WIDE, WIDE_CUDA, LLAMA_1B) and proposer in ("draft", WIDE_Q4, WIDE_WEAK)
    if workload == GUIDED:
        return "", None
    if drafted and concurrency == 1:
        if acceptance is None:
            return f"≥ 1.3× where acceptance ≥ 0.6 (fewer than {MIN_DRAFTS} drafts a round)", None
        if acceptance < 0.6:
            return "≥ 1.3× where acceptance ≥ 0.6 (acceptance below)", None
        return "≥ 1.3×", ratio >= 1.3
    if concurrency == max(CONCURRENCY) and model in ("small-llama", LLAMA_1B):
        return "≥ 0.95×", ratio >= 0.95
    grounded = concurrency == 1 and proposer == "ngram" and workload == "grounded"
    if grounded and model in ("small-llama", SMALL_1B):
        return "≥ 1.8×", ratio >= 1.8
    return "", None


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, help="keep the models here (reused)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--concurrency-1-only",
        action="store_true",
        help="only the concurrency-1 cases (a variant of its own: the module's docstring)",
    )
    parser.add_argument(
        "--shared", type=Path, default=SHARED, help="the folder holding models/ and data/"
    )
    parser.add_argument(
        "--speculative-max-seqs",
        type=int,
        default=None,
        help="the engine option (default: the engine's default)",
    )
    args = parser.parse_args()
    if args.speculative_max_seqs is None:
        from llmkit.runtime.engine_config import EngineConfig

        args.speculative_max_seqs = EngineConfig().speculative_max_seqs
    return args


if __name__ == "__main__":
    main()
