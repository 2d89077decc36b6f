"""The one place that turns scheduled sequences into tensors, runs the model over the paged
KV cache, and samples next tokens (and scores prompt tokens) from its logits."""

from __future__ import annotations

import functools
import itertools
import math
import threading
from dataclasses import dataclass, field

import torch

from llmkit.checkpoint.rank_tensors import open_rank
from llmkit.kernels import cpu as cpu_kernels
from llmkit.runtime.block_manager import BlockManager
from llmkit.runtime.distributed import Group
from llmkit.runtime.layers import pages
from llmkit.runtime.layers.attention import AttentionMetadata, Prefill, padded_tables
from llmkit.runtime.layers.sampler import Sampled, Sampler, score
from llmkit.runtime.loader import load_model
from llmkit.runtime.lora import LoraContext, install, read_adapter
from llmkit.runtime.models.llama import LlamaConfig
from llmkit.runtime.scheduler import Batch
from llmkit.runtime.sequence import Sequence


@dataclass(slots=True)
class StepInputs:
    """Everything a rank needs for one forward pass (plain tensors: it is broadcast as is)."""

    input_ids: torch.Tensor  # [tokens]
    positions: torch.Tensor  # [tokens]
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # [sequences to sample], rows of the flattened batch
    # (adapter id, first row, end row) of each run of tokens of one LoRA adapter
    lora_segments: list[tuple[int, int, int]] = field(default_factory=list)
    # > 1: that many greedy decode steps in one call (prepare_steps): a token per sequence,
    # slot_mapping [steps * sequences] step-major, the block tables covering every step
    steps: int = 1

    def pack(self) -> torch.Tensor:
        """These inputs as one int64 tensor (the other ranks' copy of a step: one broadcast,
        nothing pickled); `unpack` reads it back."""
        meta = self.meta
        blocks = meta.decode_blocks if meta.decode_blocks is not None else _LONGS.view(0, 0)
        lens = meta.decode_lens if meta.decode_lens is not None else _LONGS
        prefills = [x for p in meta.prefills for x in (p.start, p.length, p.computed,
                                                       len(p.blocks), *p.blocks)]  # fmt: skip
        header = [self.steps, len(self.input_ids), len(meta.slot_mapping), meta.num_decodes,
                  *blocks.shape, len(meta.prefills), len(self.logits_indices),
                  len(self.lora_segments)]  # fmt: skip
        lora = [x for segment in self.lora_segments for x in segment]
        parts = [header, self.input_ids, self.positions, meta.slot_mapping, blocks.flatten(),
                 lens, prefills, self.logits_indices, lora]  # fmt: skip
        return torch.cat([torch.as_tensor(p, dtype=torch.long) for p in parts])

    @classmethod
    def unpack(cls, packed: torch.Tensor) -> StepInputs:
        """The StepInputs `pack` made `packed` of (a CPU tensor)."""
        at = 9
        header = packed[:at].tolist()
        steps, tokens, slots, decodes, rows, width, num_prefills, logits, loras = header

        def take(n: int) -> torch.Tensor:
            nonlocal at
            at += n
            return packed[at - n : at]

        ids, positions, slot_mapping = take(tokens), take(tokens), take(slots)
        meta = AttentionMetadata(slot_mapping, decodes)
        if rows:
            meta.decode_blocks, meta.decode_lens = take(rows * width).view(rows, width), take(rows)
        for _ in range(num_prefills):
            start, length, computed, n = take(4).tolist()
            meta.prefills.append(Prefill(start, length, computed, take(n).tolist()))
        logits_indices = take(logits)
        segments = [tuple(take(3).tolist()) for _ in range(loras)]
        return cls(ids, positions, meta, logits_indices, segments, steps)

    def to(self, device: torch.device) -> StepInputs:
        """These inputs on `device` (they are built on the CPU, and used there as they are)."""
        if device.type == "cpu":
            return self
        return StepInputs(  # no stream synchronization: pageable memory is staged at once
            self.input_ids.to(device, non_blocking=True),
            self.positions.to(device, non_blocking=True),
            self.meta.to(device),
            self.logits_indices.to(device, non_blocking=True),
            self.lora_segments,
            self.steps,
        )


_LONGS = torch.zeros(0, dtype=torch.long)


@dataclass(slots=True)
class StepOutput:
    """What one step computed: the new tokens of each sequence in `seqs` (in that order:
    one, or for a sequence that verified a draft, the draft tokens accepted then one of the
    model's own), and the prompt tokens it scored: (sequence, position of the first one,
    their scores)."""

    seqs: list[Sequence]
    sampled: list[list[Sampled]]
    prompt_scores: list[tuple[Sequence, int, list[Sampled]]]

    def accepted(self, batch: Batch) -> list[int]:
        """Per sequence of `batch`: how many of its draft tokens were accepted."""
        new = {
            seq.seq_id: len(tokens) - 1 for seq, tokens in zip(self.seqs, self.sampled, strict=True)
        }
        return [
            new.get(seq.seq_id, 0) if d else 0
            for seq, d in zip(batch.seqs, batch.drafts, strict=True)
        ]


def kv_block_bytes(cfg: LlamaConfig, tp: int, block_size: int, itemsize: int) -> int:
    """Bytes of K and V for one block of tokens over all layers, on one rank."""
    kv_heads = cfg.heads_per_rank(tp)[1]
    return 2 * cfg.num_layers * block_size * kv_heads * cfg.head_dim * itemsize


class ModelRunner:
    def __init__(
        self,
        model_path: str,
        group: Group,
        dtype: torch.dtype,
        device: torch.device,
        num_blocks: int,
        block_size: int,
        exact: bool = False,
        max_loras: int = 0,
        graph_seqs: int = 0,
        max_blocks: int = 0,
    ):
        """graph_seqs > 0: decode steps of up to that many tokens replay CUDA graphs
        (runtime/cuda_graphs.py; CUDA, one rank, no LoRA adapters), with block tables up to
        `max_blocks` wide."""
        src = open_rank(model_path, group.size, group.rank)
        self.loras = LoraContext() if max_loras else None
        try:
            self.model, self.config = load_model(src, group, dtype, device, exact, self.loras)
        finally:
            src.close()
        self.dtype = dtype
        self.device, self.block_size, self.num_blocks = device, block_size, num_blocks
        kv_heads = self.config.heads_per_rank(group.size)[1]
        # per layer [2, blocks, kv_heads, block_size, head_dim]
        shape = (self.config.num_layers, 2, num_blocks, kv_heads, block_size, self.config.head_dim)
        self.kv_caches = list(_zeros(shape, dtype, device))
        self.sampler = Sampler()
        if device.type == "cpu":
            cpu_kernels.ops()  # built now (once per machine), not in the first step
        self.graphs = None
        if graph_seqs and device.type == "cuda" and group.size == 1 and self.loras is None:
            from llmkit.runtime.cuda_graphs import DecodeGraphs

            self.graphs = DecodeGraphs(self.model, self.kv_caches, graph_seqs, max_blocks, device)

    def execute(self, inputs: StepInputs) -> torch.Tensor | None:
        """Logits [sequences to sample, vocab] in float32 (None on ranks other than 0)."""
        if self.graphs is not None and self.graphs.takes(inputs):
            return self.graphs.run(inputs)
        inputs = inputs.to(self.device)
        if self.loras is not None:
            self.loras.segments = inputs.lora_segments
        return self.model(
            inputs.input_ids, inputs.positions, inputs.meta, self.kv_caches, inputs.logits_indices
        )

    def runs_steps(self) -> bool:
        """Whether `greedy_steps` runs here: the whole decode step is one C++ call (CPU) or
        one graph replay (CUDA)."""
        if self.graphs is not None:
            return True
        return self.device.type == "cpu" and self.model.runs_steps(self.kv_caches)

    def greedy_steps(
        self, inputs: StepInputs, seqs: list[Sequence], launched: threading.Event | None = None
    ) -> StepOutput:
        """The StepOutput of `inputs.steps` greedy decode steps (prepare_steps) of `seqs`,
        which run the base model (no LoRA adapter); `launched` is set once their work is
        launched (CUDA) or done (CPU)."""
        if self.graphs is not None:
            chosen = self.graphs.greedy_steps(inputs)
        else:
            steps, meta = inputs.steps, inputs.meta
            slots = meta.slot_mapping.view(steps, len(seqs))
            args = (inputs.input_ids, inputs.positions, slots, meta, self.kv_caches, steps)
            chosen = self.model.greedy_steps(*args)
        if launched is not None:
            launched.set()
        return StepOutput(seqs, [[Sampled(t) for t in row] for row in chosen.tolist()], [])

    def add_lora(self, lora_id: int, path: str, max_rank: int) -> None:
        """Load the PEFT adapter in `path` as `lora_id` (LlmkitError if it does not fit)."""
        adapter = read_adapter(path, max_rank)
        # CPUs without native 16-bit matmuls run the small products far faster in float32
        dtype = torch.float32 if self.device.type == "cpu" else self.dtype
        install(self.model.lora_modules, lora_id, adapter, dtype, self.device)

    def remove_lora(self, lora_id: int) -> None:
        for wrapper in self.model.lora_modules.values():
            wrapper.remove(lora_id)

    def finish(
        self,
        logits: torch.Tensor,
        sampled: Sampling,
        spans: list[PromptSpan],
        masks: dict | None = None,
    ) -> StepOutput:
        """A step's logits (as `prepare` ordered them) -> its StepOutput; `masks`: the
        tokens guided sequences may sample (seq_id -> bit mask)."""
        seqs, drafts = sampled.seqs, sampled.drafts
        rows = len(seqs) + sum(map(len, drafts))
        scores = _score_prompts(spans, logits[rows:]) if spans else []
        if not seqs:
            return StepOutput(seqs, [], scores)
        logits = logits[:rows] if spans else logits  # the prompt rows come after these
        history = [(s.prompt_token_ids, s.output_token_ids) for s in seqs]
        seeds = [s.seed for s in seqs]
        params = [s.params for s in seqs]
        row_masks = [masks.get(s.seq_id) for s in seqs] if masks else None
        seq_ids = [s.seq_id for s in seqs]
        if any(drafts):
            tokens = self.sampler.verify(
                logits, params, history, seeds, drafts, sampled.draft_probs, row_masks, seq_ids
            )
            return StepOutput(seqs, tokens, scores)
        tokens = self.sampler(logits, params, history, seeds, row_masks, seq_ids)
        return StepOutput(seqs, [[t] for t in tokens], scores)

    def window_logits(self, windows: list[list[int]]) -> torch.Tensor:
        """Logits [windows, len, vocab] (float32) at every position of equal-length token
        windows, each run from an empty cache; the cache must hold them all."""
        blocks = BlockManager(self.num_blocks, self.block_size, enable_prefix_caching=False)
        batch = Batch()
        for window in windows:
            seq = Sequence(window)
            blocks.allocate(seq, len(window))
            batch.add(seq, len(window))
        inputs, _, _ = prepare(batch, self.block_size)
        inputs.logits_indices = torch.arange(sum(map(len, windows)))
        return self.execute(inputs).view(len(windows), len(windows[0]), -1)


def _score_prompts(spans: list[PromptSpan], logits: torch.Tensor) -> list:
    """(sequence, first position scored, scores) of each span: the log probability of each
    prompt token given the ones before it."""
    scores, row = [], 0
    for span in spans:
        seq = span.seq
        nxt = seq.prompt_token_ids[span.start + 1 : span.start + 1 + span.count]
        scored = score(logits[row : row + span.count], nxt, seq.params.prompt_logprobs)
        scores.append((seq, span.start + 1, scored))
        row += span.count
    return scores


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Zeros (masked padding reads must be finite). On CPU in 2 MiB pages (layers/pages.py),
    else from calloc'ed numpy memory; either way pages are only committed as blocks are first
    written: RSS follows the cache's use."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    cache = pages.zeros(shape, dtype)
    if cache is not None:
        return cache
    import numpy as np

    raw = np.zeros((math.prod(shape) * dtype.itemsize,), dtype=np.uint8)
    return torch.from_numpy(raw).view(dtype).view(shape)


@dataclass(frozen=True, slots=True)
class PromptSpan:
    """Logits rows of prompt positions start..start+count-1 of `seq` (each row scores the
    prompt's next token), returned after the rows of the sequences to sample."""

    seq: Sequence
    start: int
    count: int


@dataclass(frozen=True, slots=True)
class Sampling:
    """The sequences whose logits come back, in order, and each one's draft: its logits
    rows are the draft's length + 1 (the positions of its last token and of the draft)."""

    seqs: list[Sequence]
    drafts: list[list[int]]
    draft_probs: list  # per sequence: what its draft was drawn from, or None


def prepare(
    batch: Batch, block_size: int, decode_upto: int = 1
) -> tuple[StepInputs, Sampling, list[PromptSpan]]:
    """Tensors for `batch`, decodes first; the sequences whose logits come back; and the
    prompt spans whose logits follow theirs. A sequence computing at most `decode_upto`
    tokens runs them as decodes (a draft model catching up on the tokens its target
    accepted: the step a CUDA graph can replay)."""

    # decodes first (a draft's tokens are decodes too: each one a query of its own over the
    # sequence's blocks); each adapter's sequences together, so its tokens are few runs
    def decodes(i: int) -> bool:
        return batch.num_new_tokens[i] <= decode_upto or bool(batch.drafts[i])

    order = sorted(range(len(batch.seqs)), key=lambda i: (not decodes(i), batch.seqs[i].lora_id))
    seqs = [batch.seqs[i] for i in order]
    counts = [batch.num_new_tokens[i] for i in order]
    drafts = [batch.drafts[i] for i in order]
    num_decodes = sum(decodes(i) for i in order)  # sequences
    ids: list[int] = []
    positions: list[int] = []
    rows: list[int] = []  # each token's sequence, as an index into `seqs`
    for i, (seq, n, draft) in enumerate(zip(seqs, counts, drafts, strict=True)):
        start = seq.num_computed_tokens
        ids += seq.tokens(start, start + n - len(draft)) + draft
        positions += range(start, start + n)
        rows += [i] * n
    ends = [s.num_computed_tokens + n for s, n in zip(seqs, counts, strict=True)]
    positions_t = torch.tensor(positions, dtype=torch.long)
    meta = _metadata(seqs, counts, ends, num_decodes, block_size, rows, positions)
    last_rows = list(itertools.accumulate(counts))  # one past each sequence's last token
    sampled = [
        i
        for i, (s, end, draft) in enumerate(zip(seqs, ends, drafts, strict=True))
        if end == s.num_tokens + len(draft)
    ]
    logits_rows = [
        r for i in sampled for r in range(last_rows[i] - len(drafts[i]) - 1, last_rows[i])
    ]
    spans = _prompt_spans(seqs, counts, last_rows, logits_rows)
    inputs = StepInputs(
        torch.tensor(ids, dtype=torch.long),
        positions_t,
        meta,
        torch.tensor(logits_rows, dtype=torch.long),
        _lora_segments(seqs, counts),
    )
    sampled_seqs = [seqs[i] for i in sampled]
    probs = [batch.draft_probs.get(s.seq_id) for s in sampled_seqs]
    return inputs, Sampling(sampled_seqs, [drafts[i] for i in sampled], probs), spans


def prepare_steps(batch: Batch, block_size: int) -> StepInputs:
    """Tensors for `batch.steps` greedy decode steps of every sequence of `batch` (each
    scheduled for that many tokens): each one's last token and position, the slots of the
    positions each step computes, and block tables for the last step."""
    seqs, steps = batch.seqs, batch.steps
    starts = [s.num_computed_tokens for s in seqs]
    slots = [_slots(s.block_table, p + j, p + j + 1, block_size)[0] for j in range(steps)
             for s, p in zip(seqs, starts, strict=True)]  # fmt: skip
    width = -(-(max(starts) + steps) // block_size)
    as_long = functools.partial(torch.tensor, dtype=torch.long)
    meta = AttentionMetadata(as_long(slots), len(seqs))
    meta.decode_blocks = padded_tables([s.block_table for s in seqs], width)
    meta.decode_lens = as_long([p + 1 for p in starts])
    ids = [s.tokens(p, p + 1)[0] for s, p in zip(seqs, starts, strict=True)]
    return StepInputs(as_long(ids), as_long(starts), meta, torch.arange(len(seqs)), steps=steps)


def _lora_segments(seqs: list[Sequence], counts: list[int]) -> list[tuple[int, int, int]]:
    """(adapter id, first row, end row) of each run of tokens of one adapter."""
    segments: list[tuple[int, int, int]] = []
    row = 0
    for seq, n in zip(seqs, counts, strict=True):
        if seq.lora_id and segments and segments[-1][0] == seq.lora_id and segments[-1][2] == row:
            segments[-1] = (seq.lora_id, segments[-1][1], row + n)
        elif seq.lora_id:
            segments.append((seq.lora_id, row, row + n))
        row += n
    return segments


def _prompt_spans(seqs, counts, last_rows, logits_rows: list[int]) -> list[PromptSpan]:
    """Spans of prompt positions whose next-token logits are wanted; appends their rows."""
    spans = []
    for seq, n, row_end in zip(seqs, counts, last_rows, strict=True):
        start = seq.num_computed_tokens
        stop = min(start + n, seq.num_prompt_tokens - 1)  # the last one predicts the output
        if seq.wants_prompt_logprobs and stop > start:
            first_row = row_end - n
            logits_rows += range(first_row, first_row + stop - start)
            spans.append(PromptSpan(seq, start, stop - start))
    return spans


def _slots(table: list[int], start: int, end: int, block_size: int) -> list[int]:
    """The cache slots of positions start..end-1 of a sequence with block table `table`."""
    slots: list[int] = []
    while start < end:  # a block's part at a time
        first = start - start % block_size
        stop = min(end, first + block_size)
        base = table[start // block_size] * block_size - first
        slots += range(base + start, base + stop)
        start = stop
    return slots


def _metadata(seqs, counts, ends, num_decodes, block_size, rows, positions) -> AttentionMetadata:
    """rows, positions: [tokens], each token's sequence (index into `seqs`) and position;
    the first `num_decodes` sequences decode: each of their tokens is one query. Built from
    lists (a decode step's tensors are small: a torch op per field costs more than it saves)."""
    tables = [s.block_table for s in seqs]
    slots: list[int] = []
    for table, n, end in zip(tables, counts, ends, strict=True):
        slots += _slots(table, end - n, end, block_size)
    start = sum(counts[:num_decodes])  # decode tokens
    meta = AttentionMetadata(torch.tensor(slots, dtype=torch.long), start)
    if num_decodes:
        lengths = [p + 1 for p in positions[:start]]  # each query sees the keys up to its own
        width = -(-max(lengths) // block_size)
        queries = rows[:start] if start > num_decodes else None  # drafts: a row per token
        meta.decode_blocks = padded_tables(tables[:num_decodes], width, queries)
        meta.decode_lens = torch.tensor(lengths, dtype=torch.long)
    for i in range(num_decodes, len(seqs)):
        n, end = counts[i], ends[i]
        meta.prefills.append(Prefill(start, n, end - n, tables[i][: -(-end // block_size)]))
        start += n
    return meta
