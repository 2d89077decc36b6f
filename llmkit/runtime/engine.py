"""The engine: requests in, tokens out, one scheduled step at a time.

`add_request` / `step` / `abort` / `has_unfinished` drive it (the server's loop calls them);
`LLM.generate` runs a list of prompts to completion for offline batch inference.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

from llmkit.checkpoint import checksums, dtypes
from llmkit.checkpoint.fast_tokenizer import encode_prompt, load_tokenizer
from llmkit.checkpoint.rank_tensors import RankTensors, open_rank
from llmkit.devices import bind, resolve_device
from llmkit.errors import LlmkitError
from llmkit.runtime.backoff import Backoff
from llmkit.runtime.block_manager import BlockManager
from llmkit.runtime.detokenizer import Detokenizer
from llmkit.runtime.engine_config import NGRAM, EngineConfig
from llmkit.runtime.executor import DTYPES, Executor, RunnerSpec, cuda_memory, set_threads
from llmkit.runtime.guide import Guides, GuideTokenizer
from llmkit.runtime.layers.sampler import Sampled
from llmkit.runtime.lora_registry import LoraRegistry
from llmkit.runtime.model_runner import StepOutput, kv_block_bytes
from llmkit.runtime.models.llama import LlamaConfig
from llmkit.runtime.outputs import (
    Completion,
    RequestOutput,
    RequestTimes,
    SpecStats,
    check_prompt_ids,
)
from llmkit.runtime.pacing import DecodePacer
from llmkit.runtime.scheduler import Batch, Scheduler
from llmkit.runtime.sequence import SamplingParams, Sequence, ends_by_token, stop_reason
from llmkit.runtime.speculative import (
    Draft,
    DraftProposer,
    NgramProposer,
    check_draft,
)

log = logging.getLogger("llmkit.engine")
MAX_PROPOSER_FAILURES = 3  # proposer failures in a row after which the engine stops speculating
MAX_FORCED = 16  # the most tokens a guide forces that one step verifies as a sequence's draft
CPU_KV_CACHE_LIMIT = 4 * 2**30  # default cap on CPU when --kv-cache-memory is not given


@dataclass(slots=True)
class _Request:
    request_id: str
    prompt_token_ids: list[int]
    seqs: list[Sequence]
    detokenizers: list[Detokenizer | None]
    times: RequestTimes
    logprobs: list[list[dict]] = field(default_factory=list)
    prompt_logprobs: list[dict | None] | None = None


@dataclass(slots=True)
class _Step:
    """A scheduled step, as it runs: its batch, what it was given, and when it ran."""

    batch: Batch
    masks: Callable[[], dict] | None
    paced: bool  # its call's time goes to the DecodePacer
    verifies: bool  # its time goes to the proposer
    proposing: float  # perf_counter() before its drafts were proposed
    start: float = 0.0  # perf_counter() around the executor's step
    end: float = 0.0
    future: Future | None = None  # async output: from the step thread, or done (CPU)


class Engine:
    def __init__(self, model: str | Path, config: EngineConfig | None = None):
        config = config or EngineConfig()
        self.config = config
        self.model_path = str(model)
        device = resolve_device(config.device)
        if device.type == "cpu":
            set_threads(config.threads)
        self.draft_dir = _draft_dir(config.speculative, config.speculative_revision)
        src = open_rank(self.model_path, config.tp, 0)  # headers only: checks the layout
        try:
            hf_config = src.config
            self.model_config = LlamaConfig.from_hf(hf_config)
            _check_context(config.max_model_len, self.model_config.max_position_embeddings)
            dtype = _resolve_dtype(config.dtype, hf_config, device.type)
            self.kv_block_bytes = kv_block_bytes(
                self.model_config, config.tp, config.block_size, DTYPES[dtype].itemsize
            )
            num_blocks = self._num_blocks(device, src, DTYPES[dtype].itemsize)
        finally:
            src.close()
        if config.verify:  # the model's weights, and a draft model's
            for directory in (Path(self.model_path), self.draft_dir):
                if directory is not None:
                    checksums.verify(directory)
        # Everything a user can get wrong is checked before the weights are loaded.
        self.block_manager = BlockManager(
            num_blocks, config.block_size, config.enable_prefix_caching
        )
        self.scheduler = Scheduler(
            self.block_manager,
            config.max_num_seqs,
            config.max_num_batched_tokens,
            config.scheduling_policy,
        )
        capacity = num_blocks * config.block_size
        self.max_model_len = min(
            config.max_model_len or self.model_config.max_position_embeddings, capacity
        )
        self.executor = Executor(
            RunnerSpec(
                self.model_path,
                config.tp,
                dtype,
                str(device),
                num_blocks,
                config.block_size,
                config.max_loras,
                graph_seqs=0 if config.enforce_eager else config.max_num_seqs,
                max_blocks=-(-self.max_model_len // config.block_size),
            )
        )
        self.tokenizer = load_tokenizer(self.model_path)
        self.eos_token_ids = _eos_ids(self.model_path, hf_config)
        self.guides = Guides(GuideTokenizer(self.tokenizer, self.model_config.vocab_size))
        self._guide_thread: ThreadPoolExecutor | None = None
        self.loras = LoraRegistry(config.max_loras)
        try:
            self.proposer = self._proposer()
        except BaseException:
            self.executor.close()  # the model's workers and memory, before the one line
            raise
        self.spec_stats = SpecStats()
        self._proposer_failures = 0  # rounds in a row whose proposer raised
        self.backoff = Backoff()
        self.pacer = DecodePacer(config.decode_steps, config.decode_call_ms)
        self.requests: dict[str, _Request] = {}
        self.async_output = _async_output(config.async_output, device.type)
        self._step_thread: ThreadPoolExecutor | None = None
        self._running: _Step | None = None  # the step the model runs (async output)
        self._touched: dict[str, _Request] = {}  # requests taken steps advanced, to emit
        self._failed: list[RequestOutput] = []  # outputs of requests that failed, to emit
        self.num_kv_tokens = capacity
        log.info(
            "KV cache: %d blocks of %d tokens = %d tokens", num_blocks, config.block_size, capacity
        )

    def add_request(
        self,
        request_id: str,
        prompt: str | None = None,
        prompt_token_ids: list[int] | None = None,
        params: SamplingParams | None = None,
        arrival: float | None = None,
        lora: str | None = None,
    ) -> None:
        """Queue a request; raises LlmkitError for a prompt the model cannot take.
        `arrival`: its time.monotonic() when it reached the caller (default: now); `lora`:
        the name of a loaded LoRA adapter to run it with."""
        params = params or SamplingParams()
        if request_id in self.requests:
            raise LlmkitError(f"request id {request_id!r} is already running")
        ids = self._prompt_ids(prompt, prompt_token_ids)
        lora_id = 0 if lora is None else self.loras.id_of(lora)
        seqs: list[Sequence] = []
        for i in range(params.n):
            seed = None if params.seed is None else (params.seed + i) % 2**64  # torch's range
            parent = seqs[0] if seqs else None
            seqs.append(Sequence(list(ids), params, request_id, parent, seed, lora_id))
        if params.guide is not None:
            if self.tokenizer is None:
                raise LlmkitError(f"{self.model_path} has no tokenizer to guide output with")
            self.guides.start([s.seq_id for s in seqs], params.guide)
        detok = [self._detokenizer(ids, params) for _ in seqs]
        times = RequestTimes(time.monotonic() if arrival is None else arrival)
        request = _Request(request_id, ids, seqs, detok, times, [[] for _ in seqs])
        if params.prompt_logprobs is not None:
            request.prompt_logprobs = [None] * len(ids)
        self.requests[request_id] = request
        for seq in seqs:
            self.backoff.start(seq, self._steps_ahead() and self._runs_ahead(seq))
            self.scheduler.add(seq)

    def add_lora(self, name: str, path: str) -> None:
        """Load the PEFT LoRA adapter in `path` under `name` (LlmkitError: it does not fit
        the model, or --max-loras are loaded)."""
        lora_id = self.loras.new_id(name)
        self._settle()
        self.executor.add_lora(lora_id, path, self.config.max_lora_rank)
        self.loras.add(name, lora_id)

    def remove_lora(self, name: str) -> None:
        """Unload adapter `name`: new requests cannot name it; running ones finish with it."""
        self.loras.retire(name)
        self._settle()
        self._drop_retired_loras()

    def _drop_retired_loras(self) -> None:
        if self.loras.retiring:
            in_use = {s.lora_id for r in self.requests.values() for s in r.seqs}
            for lora_id in self.loras.done(in_use):
                self.executor.remove_lora(lora_id)

    def abort(self, request_id: str) -> None:
        """Stop a request now and free its KV blocks (unknown ids are ignored)."""
        self._settle()
        for seq in self._seqs(request_id, forget=True):
            self.scheduler.finish(seq, "abort")
            self._release(seq)
        self._drop_retired_loras()

    def _release(self, seq: Sequence) -> None:
        """Forget a finished sequence's state beside the scheduler's (its guide, the draft
        model's copy of it, its backoff)."""
        self.guides.release(seq.seq_id)
        self._forget_drafts([seq])
        self.backoff.release(seq)

    def pause(self, request_id: str) -> None:
        """Stop computing a request (its client is not reading) and free its KV blocks; it
        keeps what it generated and goes on after `resume` (unknown ids are ignored)."""
        self._settle()
        for seq in self._seqs(request_id):
            self.scheduler.pause(seq)
        self._forget_drafts(self._seqs(request_id))

    def resume(self, request_id: str) -> None:
        for seq in self._seqs(request_id):
            self.scheduler.resume(seq)

    def _seqs(self, request_id: str, forget: bool = False) -> list[Sequence]:
        """The sequences of a request (none for an unknown id); `forget` drops the request."""
        request = self.requests.pop(request_id, None) if forget else self.requests.get(request_id)
        return request.seqs if request else []

    def has_unfinished(self) -> bool:
        """Whether a step has work (a step running, or outputs to give): paused requests
        wait for `resume`, not for a step."""
        return self.scheduler.has_unfinished() or self._running is not None or self._pending()

    def step(self) -> list[RequestOutput]:
        """Schedule, run the model once, sample; outputs of the requests that advanced.

        A step that fails is run again one request at a time, so an input that breaks the
        model or the sampler fails only its own request (an output with `error` set).

        With async output (EngineConfig.async_output) a call returns the outputs of the step
        before: it takes that step's tokens, starts the next step, and detokenizes them and
        builds their outputs while the model runs (on CUDA: `_start`)."""
        self._settle()
        self._drop_retired_loras()
        batch = self.scheduler.schedule()
        if batch.seqs:
            self._start(batch)
        elif not self._pending() and not (
            self.scheduler.running or batch.preempted or not self.scheduler.waiting
        ):  # else everyone was preempted this step: they run again next step
            raise LlmkitError("no waiting request fits in the KV cache; raise --kv-cache-memory")
        outputs = self._emit()
        if self._running is None:  # else the next call drops them, before its step
            self._drop_retired_loras()
        return outputs

    def _start(self, batch: Batch) -> None:
        """Run `batch`: at once and taken (`_take`), or, with async output, on the step
        thread, returning once the model's work is launched, so the caller's host work
        overlaps the rest; the next `_settle` takes it. On the CPU, where the work is done,
        not launched, before the call could go on, an async step runs here, on the thread
        whose OpenMP workers ran the model so far (a second thread's would be a second team,
        and while both exist their workers sleep between parallel regions instead of
        spinning); the next `_settle` takes it all the same."""
        self._mark_scheduled(batch.seqs)
        self._forget_drafts(batch.preempted)
        proposing = time.perf_counter()
        paced = self._run_ahead(batch, self._speculate(batch))
        verifies = self.proposer is not None and batch.verifies()
        step = _Step(batch, self._masks(batch), paced, verifies, proposing)
        if not self.async_output:
            self._take(step, lambda: self._run(step, None))
            return
        device = self.executor.device
        if device.type == "cpu":
            step.future = _done(lambda: self._run(step, None))
        else:
            step.future = self._launch(step, device)
        self._running = step

    def _launch(self, step: _Step, device) -> Future:
        """`step` run on the step thread, returned once its model work is launched."""
        if self._step_thread is None:  # the model's device current on it, as on this one
            self._step_thread = ThreadPoolExecutor(
                1, thread_name_prefix="llmkit-step", initializer=bind, initargs=(device,)
            )
        launched = threading.Event()
        future = self._step_thread.submit(self._run, step, launched)
        launched.wait()
        return future

    def _run(self, step: _Step, launched: threading.Event | None) -> StepOutput:
        """The executor's step of `step.batch`, timed into `step` (`launched` is set once
        the model's work is launched, or the step failed)."""
        try:
            step.start = time.perf_counter()
            out = self.executor.step(step.batch, step.masks, launched)
            step.end = time.perf_counter()
            return out
        finally:
            if launched is not None:
                launched.set()

    def _settle(self) -> None:
        """Wait for the step the model is running (async output) and take its tokens."""
        step, self._running = self._running, None
        if step is not None:
            self._take(step, step.future.result)

    def _pending(self) -> bool:
        """Whether taken tokens or failures wait for `_emit`."""
        return bool(self._touched or self._failed)

    def _take(self, step: _Step, result: Callable[[], StepOutput]) -> None:
        """Advance the sequences of a step that ran by the tokens it sampled (`result()`
        gives them, or raises): what needs no text (EOS, max_tokens, guides) ends them now;
        their text waits for `_emit`, but for requests with stop strings, which are
        detokenized now (whether they go on depends on it)."""
        batch = step.batch
        round_s = None  # the proposals and the step, where it verified decodes only
        try:
            runs = [(batch, result())]
            seconds = step.end - step.start
            if step.paced:
                self.pacer.record(len(batch.seqs), batch.steps, seconds)
            if step.verifies:
                self.proposer.verified(seconds)
                round_s = step.end - step.proposing
        except Exception as e:
            runs = self._by_request(batch, step.masks, e)
        now = time.monotonic()
        for part, out in runs:
            accepted = out.accepted(part)
            self.scheduler.update(part, accepted)
            self._record_drafts(part, accepted, round_s)
            self._record_prompt_scores(out)
            for seq, tokens in zip(out.seqs, out.sampled, strict=True):
                for token in tokens:
                    self._touched[seq.request_id] = self._advance(seq, token, now)
                    if seq.is_finished:
                        break

    def _by_request(self, batch: Batch, masks, error: Exception) -> list:
        """After a step of `batch` failed with `error`: (part, StepOutput) of each request's
        part run again alone; a request that fails alone too ends with the error."""
        if len({s.request_id for s in batch.seqs}) == 1:
            self._failed.append(self._fail(batch.seqs[0].request_id, error))
            return []
        log.warning("a step of %d sequences failed (%s); running it request by request",
                    len(batch.seqs), error)  # fmt: skip
        runs = []
        for part in _by_request(batch):
            try:
                runs.append((part, self.executor.step(part, masks)))
            except Exception as e:
                self._failed.append(self._fail(part.seqs[0].request_id, e))
        return runs

    def _emit(self) -> list[RequestOutput]:
        """The outputs of the requests taken steps advanced, and of those that failed;
        requests aborted since are left out."""
        touched, self._touched = self._touched, {}
        failed, self._failed = self._failed, []
        live = [r for r in touched.values() if self.requests.get(r.request_id) is r]
        return failed + [self._output(r) for r in live]

    def _speculate(self, batch: Batch) -> int | None:
        """Give the step's decoding sequences drafts to verify: the tokens a guided
        sequence's guide forces next (`_forced`), which the proposer continues where
        speculation is on (`_propose`). The most decode steps the call may run before a
        sequence wants drafts again (None: no limit)."""
        decodes = [i for i in range(len(batch.seqs)) if batch.decodes(i)]
        forced = self._forced(batch, decodes)
        limit = self._propose(batch, decodes, forced)
        for i, tokens in forced.items():
            if not batch.drafts[i] and self.scheduler.speculate(batch, i, tokens):
                batch.forced[batch.seqs[i].seq_id] = len(tokens)
        return limit

    def _forced(self, batch: Batch, decodes: list[int]) -> dict[int, list[int]]:
        """Row -> the tokens its guide forces next (each the only one it allows), for the
        guided decodes whose request allows speculation: verified as a draft, they are
        accepted for sure (the model's masked distribution has nothing else), so a step
        adds them all, at any load and after any failed round. At most MAX_FORCED, never
        past max_tokens or the context."""
        if not self.guides.matchers:
            return {}
        out = {}
        for i in decodes:
            seq = batch.seqs[i]
            size = min(MAX_FORCED, self._room(seq) - 1) if seq.params.speculative else 0
            if size > 0 and (tokens := self.guides.forced(seq.seq_id, size)):
                out[i] = tokens
        return out

    def _propose(self, batch: Batch, decodes: list[int], forced: dict[int, list[int]]):
        """The proposer's drafts for the decodes it may speculate (at most
        --speculative-max-seqs sequences are running or waiting: prompts still to prefill
        are load too, since a step computing them gains nothing from drafts and a draft
        model would first have to catch up on each prompt; the request allows it, is not
        past its token limits and does not sit out failed rounds: Backoff), each beginning
        with the tokens its guide forces, given to the batch where the proposer added to
        them. The most decode steps the call may run before a sequence wants drafts again
        (None: no limit)."""
        if self.proposer is None or self._proposer_failures >= MAX_PROPOSER_FAILURES:
            return None
        load = len(self.scheduler.running) + len(self.scheduler.waiting)
        if load > self.config.speculative_max_seqs:
            self.backoff.crowded(batch.seqs)
            return None
        if not decodes:
            return None
        sizes = {i: self._draft_size(batch.seqs[i]) for i in decodes}
        chosen = [i for i in decodes if sizes[i] > len(forced.get(i, ()))]
        seqs, prefixes = [batch.seqs[i] for i in chosen], [forced.get(i, []) for i in chosen]
        if seqs:  # a round that proposes nothing neither fails nor ends failures in a row
            try:
                drafts = self.proposer.propose(seqs, [sizes[i] for i in chosen], prefixes)
            except Exception as e:  # a draft model that fails costs the step its drafts only
                self._proposer_failed(seqs, e)
                return None
            self._proposer_failures = 0
        else:
            drafts = []
        for i, seq, draft, prefix in zip(chosen, seqs, drafts, prefixes, strict=True):
            draft = self._within_guide(seq, draft)
            if len(draft.tokens) <= len(prefix):  # nothing of its own: the prefix goes alone
                self.backoff.found_nothing(seq)
            elif self.scheduler.speculate(batch, i, draft.tokens):
                if prefix:
                    batch.forced[seq.seq_id] = len(prefix)
                if draft.probs is not None:
                    batch.draft_probs[seq.seq_id] = draft.probs
        limits = [self.backoff.call_limit(batch.seqs[i]) for i in decodes]
        return min((n for n in limits if n is not None), default=None)

    def _record_drafts(self, batch: Batch, accepted: list[int], round_s: float | None) -> None:
        """After a step's verification (`accepted[i]` of `batch.drafts[i]` taken; `round_s`:
        the seconds its proposals and the step took, None where the step computed more than
        decodes and drafts, or was split): the tokens guides forced at a draft's start are
        counted apart (SpecStats.forced); the proposer's tokens after them go to its counts,
        its Backoff (with the round's cost in steps of plain decoding: `_round_cost`) and
        its calibration."""
        lead = [batch.forced.get(s.seq_id, 0) for s in batch.seqs]
        self.spec_stats.forced += sum(min(n, f) for n, f in zip(accepted, lead, strict=True))
        if self.proposer is None:
            return
        drafts = [d[f:] for d, f in zip(batch.drafts, lead, strict=True)]
        taken = [max(0, n - f) for n, f in zip(accepted, lead, strict=True)]
        self.spec_stats.record(drafts, taken)
        self.backoff.record(batch.seqs, drafts, taken, self._round_cost(batch, round_s))
        self.proposer.observe(batch.seqs, drafts, taken)

    def _round_cost(self, batch: Batch, round_s: float | None) -> float | None:
        """A verifying step's seconds over those of a step of plain decoding that runs
        several steps a call, at the pace its latest such call of as many sequences ran
        (DecodePacer.token_s); the Backoff takes it for the sequences whose plain decoding
        runs so (`_runs_ahead`). None where nothing runs so, or nothing was timed."""
        timed = round_s is not None and self._steps_ahead()
        plain_s = self.pacer.token_s(len(batch.seqs)) if timed else None
        return round_s / plain_s if plain_s else None

    def _within_guide(self, seq: Sequence, draft: Draft) -> Draft:
        """`draft` cut where `seq`'s guide stops allowing it: a greedy request's before the
        first token the guide does not allow (the model's masked argmax is never that
        token), a sampled one's after it (rejected for sure, it leaves the residual
        distribution rejection sampling draws from, as lossless needs)."""
        allowed = self.guides.allowed(seq.seq_id, draft.tokens)
        keep = allowed if seq.params.greedy else allowed + 1
        if keep >= len(draft.tokens):
            return draft
        probs = None if draft.probs is None else draft.probs[:keep]
        return Draft(draft.tokens[:keep], probs)

    def _forget_drafts(self, seqs: list[Sequence]) -> None:
        """Free what the proposer holds for sequences whose KV blocks were freed (preempted,
        paused): a draft model's blocks go to the sequences still running, and a sequence
        is followed again from its prompt once it runs again, as the model recomputes it."""
        if self.proposer is not None:
            for seq in seqs:
                self.proposer.release(seq.seq_id)

    def _proposer_failed(self, seqs: list[Sequence], error: Exception) -> None:
        """A warning, the proposer's state for `seqs` dropped (rebuilt when they are drafted
        for again); after MAX_PROPOSER_FAILURES rounds in a row, speculation off for good."""
        self._forget_drafts(seqs)
        self._proposer_failures += 1
        name = self.proposer.name
        if self._proposer_failures < MAX_PROPOSER_FAILURES:
            log.warning("no drafts this step: the %s proposer failed (%s)", name, error)
        else:
            log.error("speculation off: the %s proposer failed %d rounds in a row (%s)", name,
                      self._proposer_failures, error)  # fmt: skip

    def _run_ahead(self, batch: Batch, limit: int | None) -> bool:
        """Let a batch of greedy decodes run several steps in one call, where the runner can
        (the whole step is one C++ call or one CUDA graph) and every sequence's next tokens
        depend on nothing but the base model's argmax (`_runs_ahead`), with no draft. As
        many steps as the pacer gives (--decode-steps, --decode-call-ms), none past any
        sequence's context and none past the most any sequence still wants, none past
        `limit` (where a sequence drafts again); a sequence that stops part-way (EOS, a stop
        string, max_tokens) ends there, and the tokens computed after it are dropped. A
        request that arrives meanwhile waits for the call before its prompt is computed.
        True when the batch is such a batch (its call is timed for the pacer), whatever the
        steps."""
        if not self._steps_ahead():
            return False
        wanted, room = 1, self.max_model_len
        for i, seq in enumerate(batch.seqs):
            if not batch.decodes(i) or not self._runs_ahead(seq):
                return False
            wanted = max(wanted, seq.params.max_tokens - len(seq.output_token_ids))
            room = min(room, self.max_model_len - seq.num_tokens)
        # none past the context; past max_tokens: dropped
        steps = min(wanted, room, self.pacer.steps(len(batch.seqs)), limit or room)
        if steps > 1:
            self.scheduler.run_ahead(batch, steps)
        return True

    def _steps_ahead(self) -> bool:
        """Whether a call may run several decode steps (`_run_ahead`)."""
        return self.config.decode_steps > 1 and self.executor.runs_steps()

    def _runs_ahead(self, seq: Sequence) -> bool:
        """Whether `seq`'s next tokens depend on nothing but the base model's argmax, so that
        its decode steps may run several a call (`_run_ahead`): greedy, no penalties,
        logprobs, guide (a mask) or LoRA adapter."""
        p = seq.params
        if not p.greedy or p.penalized or p.logprobs is not None:
            return False
        return not seq.lora_id and seq.seq_id not in self.guides.matchers

    def _draft_size(self, seq: Sequence) -> int:
        """Tokens `seq` may take on trial now: none for a request that turned speculation
        off, or that sits out after failed rounds (Backoff); never past its max_tokens or
        the context."""
        if not seq.params.speculative:
            return 0
        if self.backoff.sits_out(seq):
            return 0
        return max(0, min(self.config.num_speculative_tokens, self._room(seq) - 1))

    def _room(self, seq: Sequence) -> int:
        """Tokens `seq` may still add: up to its max_tokens and the context."""
        return min(
            seq.params.max_tokens - len(seq.output_token_ids), self.max_model_len - seq.num_tokens
        )

    def _proposer(self):
        """The proposer --speculative names (None: off). A draft model runs on the model's
        device in its dtype, with as many KV blocks and CUDA graphs as the model's, tp 1."""
        c = self.config
        if c.speculative is None:
            return None
        if c.speculative == NGRAM:
            return NgramProposer(c.ngram_min, c.ngram_max)
        path = self.draft_dir
        vocab = self.model_config.vocab_size
        draft = json.loads((path / "config.json").read_text()).get("vocab_size")
        check_draft(c.speculative, draft, vocab, _draft_tokenizer(path), self.tokenizer)
        spec = replace(self.executor.spec, model_path=str(path), tp=1, max_loras=0)
        k = c.num_speculative_tokens
        return DraftProposer(spec.build(0), spec.num_blocks, c.block_size,
                             c.draft_min_confidence, k, self.guides, vocab,
                             c.max_num_batched_tokens)  # fmt: skip

    def _masks(self, batch: Batch) -> Callable[[], dict] | None:
        """The token masks of the guided sequences that sample in this step (seq_id -> bit
        mask; for one with a draft, a mask per row the step verifies: Guides.masks),
        computed on a thread of their own while the model runs; None when none is guided."""
        matchers = self.guides.matchers
        sampling, drafts = [], {}
        for s, n, draft in zip(batch.seqs, batch.num_new_tokens, batch.drafts, strict=True):
            if s.num_computed_tokens + n - len(draft) == s.num_tokens and s.seq_id in matchers:
                sampling.append(s.seq_id)
                if draft:
                    drafts[s.seq_id] = draft
        if not sampling:
            return None
        if self._guide_thread is None:
            self._guide_thread = ThreadPoolExecutor(1, thread_name_prefix="llmkit-guide")
        masks = self.guides.masks
        return self._guide_thread.submit(masks, sampling, drafts, batch.forced).result

    def _fail(self, request_id: str, error: Exception) -> RequestOutput:
        """End one request with an error (its blocks freed); the output that says so."""
        log.error("request %s failed in the engine: %s", request_id, error)
        request = self.requests[request_id]
        self.abort(request_id)
        out = self._output(request)
        out.error = f"the engine failed on this request: {type(error).__name__}: {error}"
        return out

    def close(self) -> None:
        if self._running is not None:  # let the model finish it; its tokens are not wanted
            self._running.future.exception()
            self._running = None
        for thread in (self._step_thread, self._guide_thread):
            if thread is not None:
                thread.shutdown()
        if self.proposer is not None:
            self.proposer.close()
        self.executor.close()

    def _mark_scheduled(self, seqs: list[Sequence]) -> None:
        now = time.monotonic()
        for seq in seqs:
            times = self.requests[seq.request_id].times
            if times.first_scheduled is None:
                times.first_scheduled = now

    def _record_prompt_scores(self, out: StepOutput) -> None:
        """Record the log probability of each prompt token the step scored."""
        for seq, first, scored in out.prompt_scores:
            target = self.requests[seq.request_id].prompt_logprobs
            for i, s in enumerate(scored, start=first):
                target[i] = _logprob_entry(s)

    def _advance(self, seq: Sequence, sampled: Sampled, now: float) -> _Request:
        request = self.requests[seq.request_id]
        if request.times.first_token is None:
            request.times.first_token = now
        index = request.seqs.index(seq)
        seq.output_token_ids.append(sampled.token_id)
        if seq.params.logprobs is not None:
            request.logprobs[index].append(_logprob_entry(sampled))
        reason = None
        if seq.params.stop and self._detokenize(request, index):
            reason = "stop"
        reason = reason or stop_reason(seq, self.eos_token_ids, self.max_model_len)
        if self.guides.advance(seq.seq_id, sampled.token_id):
            reason = reason or "stop"  # the guided output is complete
        if reason:
            self.scheduler.finish(seq, reason)
            self._release(seq)
        return request

    def _detokenize(self, request: _Request, index: int) -> bool:
        """Bring the text of a request's `index`th sequence up to its tokens (a token that
        ends it, EOS or a stop token id, is not text); True at a stop string."""
        seq, detok = request.seqs[index], request.detokenizers[index]
        if detok is None or not seq.output_token_ids:
            return False
        end = len(seq.output_token_ids) - ends_by_token(seq, self.eos_token_ids)
        return detok.add_up_to(seq.output_token_ids, end)

    def _output(self, request: _Request) -> RequestOutput:
        """What `request` has generated so far, its text brought up to its tokens."""
        for index in range(len(request.seqs)):
            self._detokenize(request, index)
        outputs = [
            Completion(
                i,
                d.text if d is not None else "",
                list(s.output_token_ids),
                s.finish_reason,
                list(request.logprobs[i]) if s.params.logprobs is not None else None,
            )
            for i, (s, d) in enumerate(zip(request.seqs, request.detokenizers, strict=True))
        ]
        finished = all(s.is_finished for s in request.seqs)
        if finished:
            request.times.finished = time.monotonic()
            self.requests.pop(request.request_id, None)
        return RequestOutput(
            request.request_id,
            request.prompt_token_ids,
            outputs,
            finished,
            request.times,
            request.prompt_logprobs,
            request.seqs[0].num_cached_tokens,
        )

    def _prompt_ids(self, prompt: str | None, ids: list[int] | None) -> list[int]:
        if ids is None:
            if prompt is None:
                raise LlmkitError("a request needs a prompt or prompt_token_ids")
            if self.tokenizer is None:
                raise LlmkitError(f"{self.model_path} has no tokenizer; send prompt_token_ids")
            ids = encode_prompt(self.tokenizer, prompt)
        check_prompt_ids(ids, self.model_config.vocab_size, self.max_model_len)
        return list(ids)

    def _detokenizer(self, ids: list[int], params: SamplingParams) -> Detokenizer | None:
        if self.tokenizer is None:
            return None
        return Detokenizer(self.tokenizer, ids, params.stop, params.skip_special_tokens)

    def _num_blocks(self, device, src: RankTensors, itemsize: int) -> int:
        c, per_block = self.config, self.kv_block_bytes
        max_len = c.max_model_len or self.model_config.max_position_embeddings
        wanted = c.max_num_seqs * -(-max_len // c.block_size)
        if c.kv_cache_memory is not None:
            budget = c.kv_cache_memory
        elif device.type == "cuda":
            return self._cuda_num_blocks(device, src, per_block, itemsize)
        else:
            budget = min(CPU_KV_CACHE_LIMIT, wanted * per_block)
        num_blocks = budget // per_block
        if num_blocks < 1:
            raise LlmkitError(
                f"the KV cache budget ({budget} bytes) holds no block of {per_block} bytes; "
                "raise --kv-cache-memory"
            )
        return int(num_blocks)

    def _cuda_num_blocks(self, device, src: RankTensors, per_block: int, itemsize: int) -> int:
        """Blocks in what --gpu-memory-utilization of the GPU leaves after the weights and
        what others use; with a draft model, after its weights too, each block beside one
        of the draft model's (it holds as many)."""
        free, total = cuda_memory(device)
        utilization, weights = self.config.gpu_memory_utilization, _weight_bytes(src)
        draft_weights, draft_block = self._draft_bytes(itemsize)
        weights, per_block = weights + draft_weights, per_block + draft_block
        num_blocks = int(free - total * (1 - utilization) - weights) // per_block
        if num_blocks < 1:
            raise LlmkitError(
                f"{device} has {free / 1e9:.1f} GB free of {total / 1e9:.1f} GB: at "
                f"--gpu-memory-utilization {utilization:g}, after {weights / 1e9:.2f} GB of "
                f"weights, no KV cache block ({per_block} bytes) fits; raise "
                "--gpu-memory-utilization, free the GPU, or set --kv-cache-memory"
            )
        return num_blocks

    def draft_cutoff(self) -> float | None:
        """The chance below which the draft model's drafts end now (speculative.Cutoff;
        None without a draft model)."""
        cutoff = None if self.proposer is None else self.proposer.cutoff
        return None if cutoff is None else cutoff.value()

    def _draft_bytes(self, itemsize: int) -> tuple[int, int]:
        """(weight bytes, KV bytes a block) of the --speculative draft model on the GPU, from
        its headers; (0, 0) without one."""
        path = self.draft_dir
        if path is None:
            return 0, 0
        draft = open_rank(str(path), 1, 0)
        try:
            config = LlamaConfig.from_hf(draft.config)
            return _weight_bytes(draft), kv_block_bytes(config, 1, self.config.block_size, itemsize)
        finally:
            draft.close()


def _done(call: Callable[[], StepOutput]) -> Future:
    """A finished Future: what `call()` returned, or what it raised."""
    future: Future = Future()
    try:
        future.set_result(call())
    except Exception as e:
        future.set_exception(e)
    return future


def _async_output(option: bool | None, device_type: str) -> bool:
    """Whether each call starts the next step before it builds the outputs of the step
    before (EngineConfig.async_output; None: where the model's work is launched, CUDA)."""
    return device_type == "cuda" if option is None else option


def _check_context(max_model_len: int | None, positions: int) -> None:
    """The model computes positions 0..max_position_embeddings-1 only (its rotary table)."""
    if max_model_len is not None and not 2 <= max_model_len <= positions:
        raise LlmkitError(
            f"--max-model-len {max_model_len} must be between 2 and the model's "
            f"max_position_embeddings ({positions})"
        )


def _logprob_entry(s: Sampled) -> dict:
    return {"token_id": s.token_id, "logprob": s.logprob, "top": s.top_logprobs}


def _weight_bytes(src: RankTensors) -> int:
    """Bytes the weights will take on one rank (before loading them), from the headers."""
    return sum(
        math.prod(p.rank_shape(src.tp_rank)) * dtypes.itemsize(p.dtype) for p in src.plans.values()
    )


def _resolve_dtype(name: str, hf_config: dict, device_type: str) -> str:
    if name == "auto":
        name = hf_config.get("torch_dtype") or hf_config.get("dtype") or "float32"
        if name == "float16" and device_type == "cpu":
            name = "bfloat16"  # CPU kernels are fast in bf16, slow in fp16
    if name not in DTYPES:
        raise LlmkitError(f"--dtype {name!r}: choose auto, float32, float16 or bfloat16")
    return name


def _eos_ids(path: str, hf_config: dict) -> frozenset[int]:
    """EOS ids from generation_config.json (which may list several), else config.json."""
    generation = Path(path).expanduser() / "generation_config.json"
    source = json.loads(generation.read_text()) if generation.is_file() else hf_config
    eos = source.get("eos_token_id", hf_config.get("eos_token_id"))
    if eos is None:
        return frozenset()
    return frozenset(eos if isinstance(eos, list) else [eos])


class LLM:
    """Offline convenience: `LLM(path).generate(prompts, params)` runs them to completion."""

    def __init__(self, model: str | Path, config: EngineConfig | None = None):
        self.engine = Engine(model, config)

    def generate(
        self,
        prompts: list[str | list[int]],
        params: SamplingParams | list[SamplingParams] | None = None,
        on_output: Callable[[RequestOutput], None] | None = None,
        on_step: Callable[[list[RequestOutput]], None] | None = None,
        loras: str | list[str | None] | None = None,
    ) -> list[RequestOutput]:
        """Outputs in input order; `on_output` sees every step's outputs one by one (for
        progress), `on_step` each step's outputs together, as the step ends; `loras`: the
        loaded LoRA adapter of every prompt, or of each (None: the base model)."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        lora_list = loras if isinstance(loras, list) else [loras] * len(prompts)
        for i, (prompt, p) in enumerate(zip(prompts, params_list, strict=True)):
            text, ids = (prompt, None) if isinstance(prompt, str) else (None, list(prompt))
            try:
                self.engine.add_request(str(i), text, ids, p, lora=lora_list[i])
            except LlmkitError as e:
                raise LlmkitError(f"prompt {i}: {e}") from None
        done: dict[str, RequestOutput] = {}
        while self.engine.has_unfinished():
            outs = self.engine.step()
            if on_step is not None:
                on_step(outs)
            for out in outs:
                if on_output is not None:
                    on_output(out)
                if out.finished:
                    done[out.request_id] = out
        return [done[str(i)] for i in range(len(prompts))]

    def close(self) -> None:
        self.engine.close()


def _by_request(batch: Batch) -> list[Batch]:
    """`batch` cut into one batch per request (a request's n sequences stay together)."""
    parts: dict[str, Batch] = {}
    for seq, n, draft in zip(batch.seqs, batch.num_new_tokens, batch.drafts, strict=True):
        part = parts.setdefault(seq.request_id, Batch(steps=batch.steps))
        part.add(seq, n, draft)
        if seq.seq_id in batch.draft_probs:
            part.draft_probs[seq.seq_id] = batch.draft_probs[seq.seq_id]
        if seq.seq_id in batch.forced:
            part.forced[seq.seq_id] = batch.forced[seq.seq_id]
    return list(parts.values())


def _draft_dir(speculative: str | None, revision: str | None) -> Path | None:
    """The --speculative draft model's directory: a local one, or a hub id's snapshot at
    `revision` (downloaded, or from the local cache; None: the main branch); None for ngram
    or no speculation. Anything else is one error line."""
    from llmkit.checkpoint.reader import local_dir

    if speculative is None or speculative == NGRAM:
        return None
    try:
        path = local_dir(speculative, revision)
    except LlmkitError as e:
        raise LlmkitError(f"--speculative: {e}; give 'ngram' or a draft model") from None
    if not (path / "config.json").is_file():
        raise LlmkitError(f"--speculative {speculative}: no config.json there, so no model")
    return path


def _draft_tokenizer(path: Path):
    """A draft model's tokenizer (None: it has no tokenizer files); one that does not load
    is one error line."""
    try:
        return load_tokenizer(path)
    except Exception as e:
        raise LlmkitError(f"--speculative {path}: its tokenizer does not load ({e})") from e
