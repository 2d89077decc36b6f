"""Decode steps on CUDA replayed from CUDA graphs: one kernel-launch sequence per step
instead of hundreds of launches from Python.

A step whose tokens are all decodes (one query each: a sequence's next token or a draft's
tokens) is copied into persistent input buffers, padded up to its batch-size bucket (1, 2,
4, 8, 16, 32, then multiples of 32 up to the most sequences a step holds), and the graph
captured for that bucket replays the model over them. Graphs are captured lazily, on a
bucket's first step, all in one memory pool; `capture_seconds` says what capture has cost.
Padding rows write their K/V nowhere (slot -1) and attend to one key; their logits are cut.
Block tables are padded to the widest a context allows, so a graph's launches (and the
decode kernel's split of contexts, which depends only on shapes) hold for every step.

Several greedy decode steps in one call (--decode-steps, model_runner.prepare_steps) replay
the graph once per step with each step's argmax fed back into the buffers on the device, so
the host queues every step at once and reads the tokens once, after the last.
"""

from __future__ import annotations

import time

import torch

from llmkit.runtime.layers.attention import AttentionMetadata
from llmkit.runtime.layers.sampler import argmax


def buckets(max_seqs: int) -> list[int]:
    """The batch sizes graphs are captured for, ascending, the last one >= max_seqs."""
    sizes = [b for b in (1, 2, 4, 8, 16) if b < max_seqs]
    size = 32
    while not sizes or sizes[-1] < max_seqs:
        sizes.append(min(size, max_seqs))
        size += 32
    return sizes


def bucket_for(rows: int, sizes: list[int]) -> int | None:
    """The smallest bucket holding `rows` (None: more rows than any)."""
    return next((b for b in sizes if b >= rows), None)


class DecodeGraphs:
    def __init__(self, model, kv_caches, max_seqs: int, max_blocks: int, device):
        self.model, self.kv_caches = model, kv_caches
        self.sizes = buckets(max_seqs)
        rows = self.sizes[-1]
        self.fields = torch.zeros((4, rows), dtype=torch.long, device=device)
        self.tables = torch.zeros((rows, max_blocks), dtype=torch.int32, device=device)
        self.rows = torch.arange(rows, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None  # the graphs' one memory pool, from the first capture on
        self.capture_seconds = 0.0

    def takes(self, inputs) -> bool:
        """Whether a step runs from a graph: decodes only, few enough, tables narrow enough."""
        return inputs.steps == 1 and self.holds(inputs)

    def holds(self, inputs) -> bool:
        """Whether the buffers hold a step's rows: decodes only, few enough, tables narrow
        enough, no adapter."""
        meta = inputs.meta
        rows = len(inputs.input_ids)
        return (
            not meta.prefills
            and meta.num_decodes == rows
            and 0 < rows <= self.sizes[-1]
            and meta.decode_blocks.shape[1] <= self.tables.shape[1]
            and not inputs.lora_segments
        )

    def run(self, inputs) -> torch.Tensor:
        """The step's logits [len(logits_indices), vocab] float32, as the model gives them."""
        rows = len(inputs.input_ids)
        self._load(inputs)
        logits = self._replay(rows)
        wanted = inputs.logits_indices
        if len(wanted) == rows and bool((wanted == torch.arange(rows)).all()):
            return logits[:rows]
        return logits[wanted.to(logits.device, non_blocking=True)]

    def greedy_steps(self, inputs) -> torch.Tensor:
        """int64 [sequences, steps], on the device: `inputs.steps` greedy decode steps
        (model_runner.prepare_steps: the tables cover every step, the slots are step-major),
        each step's tokens the argmax of the logits of the one before."""
        rows, steps = len(inputs.input_ids), inputs.steps
        if not self.holds(inputs):
            raise ValueError(f"{rows} decodes do not fit the graphs' buffers")
        self._load(inputs)
        ids, positions, slots, lens = self.fields[:, :rows]
        slots_by_step = inputs.meta.slot_mapping.view(steps, rows).to(slots.device)
        tokens = torch.empty((steps, rows), dtype=torch.long, device=slots.device)
        for step in range(steps):
            if step:
                ids.copy_(tokens[step - 1])
                positions.add_(1)
                slots.copy_(slots_by_step[step])
                lens.add_(1)
            tokens[step] = argmax(self._replay(rows)[:rows])
        return tokens.t()

    def _replay(self, rows: int) -> torch.Tensor:
        """The logits [bucket, vocab] of the model over the buffers' first `rows` rows (and
        the padding of their bucket), from the bucket's graph, captured now if need be."""
        bucket = bucket_for(rows, self.sizes)
        if bucket not in self.graphs:
            self.graphs[bucket] = self._capture(bucket)
        graph, logits = self.graphs[bucket]
        graph.replay()
        return logits

    def _load(self, inputs) -> None:
        """The step's inputs into the buffers' first rows (a run of greedy steps: its first
        step's); the rows after them padded."""
        rows, meta = len(inputs.input_ids), inputs.meta
        fields = torch.zeros(self.fields.shape, dtype=torch.long)
        fields[2].fill_(-1)  # padding rows' slot: written nowhere
        fields[3].fill_(1)  # and one key to attend to
        fields[0, :rows] = inputs.input_ids
        fields[1, :rows] = inputs.positions
        fields[2, :rows] = meta.slot_mapping[:rows]
        fields[3, :rows] = meta.decode_lens
        self.fields.copy_(fields, non_blocking=True)
        width = meta.decode_blocks.shape[1]
        tables = meta.decode_blocks.to(torch.int32)
        self.tables[:rows, :width].copy_(tables, non_blocking=True)

    def _forward(self, bucket: int) -> torch.Tensor:
        f = self.fields[:, :bucket]
        meta = AttentionMetadata(f[2], bucket, self.tables[:bucket], f[3])
        return self.model(f[0], f[1], meta, self.kv_caches, self.rows[:bucket])

    def _capture(self, bucket: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """A graph of the model over the buffers' first `bucket` rows, after one eager run
        (which compiles and tunes what the capture must not)."""
        start = time.perf_counter()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._forward(bucket)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self._forward(bucket)
        torch.cuda.synchronize()
        self.capture_seconds += time.perf_counter() - start
        return graph, logits
