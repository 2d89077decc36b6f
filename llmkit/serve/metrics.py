"""Prometheus metrics of the server: counters and latency histograms fed as outputs arrive,
and gauges from the engine's latest stats when /metrics is scraped."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from llmkit.serve.engine_process import EngineStats

_LATENCY = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0)
_REQUEST = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0)
_WAIT = _LATENCY + _REQUEST[7:]  # time to first token and queue time: ms to minutes


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.prompt_tokens = Counter("llmkit_prompt_tokens", "Prompt tokens prefilled.", registry=r)
        self.generation_tokens = Counter(
            "llmkit_generation_tokens", "Tokens generated.", registry=r
        )
        self.requests = Counter(
            "llmkit_requests", "Requests ended, by finish reason.", ["finish_reason"], registry=r
        )
        self.ttft = _histogram(r, "time_to_first_token", "From arrival to the first token.", _WAIT)
        self.itl = _histogram(
            r, "inter_token_latency", "Between successive outputs of a request.", _LATENCY
        )
        self.tpot = _histogram(
            r, "time_per_output_token", "Decode time over tokens after the first.", _LATENCY
        )
        self.e2e = _histogram(
            r, "e2e_request_latency", "From arrival to the end of a request.", _REQUEST
        )
        self.queue = _histogram(
            r, "request_queue_time", "From arrival to the first scheduled step.", _WAIT
        )

    def watch(self, engine_state) -> None:
        """Report the engine's state (`engine_state()` -> EngineStats or None) at every
        scrape."""
        self.registry.register(_EngineCollector(engine_state))

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _histogram(registry, name: str, doc: str, buckets) -> Histogram:
    return Histogram(f"llmkit_{name}_seconds", doc, buckets=buckets, registry=registry)


class _EngineCollector:
    def __init__(self, engine_state):
        self.engine_state = engine_state

    def collect(self):
        stats = self.engine_state() or EngineStats()
        yield GaugeMetricFamily("llmkit_requests_running", "Sequences running.", stats.running)
        yield GaugeMetricFamily("llmkit_requests_waiting", "Sequences waiting.", stats.waiting)
        yield GaugeMetricFamily(
            "llmkit_requests_paused", "Sequences paused: their client is not reading.", stats.paused
        )
        usage = stats.used_blocks / stats.num_blocks if stats.num_blocks else 0.0
        yield GaugeMetricFamily("llmkit_kv_cache_usage", "Fraction of KV blocks held.", usage)
        yield GaugeMetricFamily("llmkit_kv_cache_used_blocks", "KV blocks held.", stats.used_blocks)
        yield GaugeMetricFamily(
            "llmkit_kv_cache_touched_blocks",
            "KV blocks that have ever held tokens (their memory is committed).",
            stats.touched_blocks,
        )
        yield GaugeMetricFamily(
            "llmkit_kv_cache_block_bytes", "Bytes of one KV block on one rank.", stats.block_bytes
        )
        yield CounterMetricFamily(
            "llmkit_preemptions", "Sequences preempted (recomputed later).", stats.preemptions
        )
        yield CounterMetricFamily(
            "llmkit_prefix_cache_hit_blocks",
            "KV blocks taken from the prefix cache.",
            stats.hit_blocks,
        )
        yield CounterMetricFamily(
            "llmkit_guided_forced_tokens",
            "Tokens guides forced (each the only one allowed), verified as drafts.",
            stats.spec.forced,
        )
        if stats.proposer:
            yield from _speculative(stats)


def _speculative(stats: EngineStats):
    """Speculative decoding's counters and gauges, labelled by proposer."""
    label, spec = ["proposer"], stats.spec
    for name, doc, value in (
        ("proposed_tokens", "Draft tokens proposed.", spec.proposed),
        ("accepted_tokens", "Draft tokens accepted.", spec.accepted),
        ("drafts", "Drafts verified (one per sequence and step).", spec.drafts),
    ):
        family = CounterMetricFamily(f"llmkit_spec_decode_{name}", doc, labels=label)
        family.add_metric([stats.proposer], value)
        yield family
    for name, doc, value in (
        ("acceptance_rate", "Draft tokens accepted / proposed, so far.", spec.acceptance_rate),
        (
            "mean_accepted_length",
            "Draft tokens accepted per draft verified, so far.",
            spec.mean_accepted_length,
        ),
    ):
        family = GaugeMetricFamily(f"llmkit_spec_decode_{name}", doc, labels=label)
        family.add_metric([stats.proposer], value)
        yield family
    yield from _by_position(stats)
    if stats.draft_cutoff is not None:
        family = GaugeMetricFamily(
            "llmkit_spec_decode_draft_cutoff",
            "The chance of being accepted below which a draft model's draft ends now (measured:"
            " its step time over the model's, unless --draft-min-confidence fixes it).",
            labels=label,
        )
        family.add_metric([stats.proposer], stats.draft_cutoff)
        yield family


def _by_position(stats: EngineStats):
    """Speculative decoding's counts by position in the draft, labelled by proposer."""
    spec = stats.spec
    for name, doc, counts in (
        (
            "proposed",
            "Drafts with a token at this position (1: a draft's first).",
            spec.proposed_at,
        ),
        (
            "accepted",
            "Drafts whose tokens up to this position (1: a draft's first) were all accepted.",
            spec.accepted_at,
        ),
    ):
        family = CounterMetricFamily(
            f"llmkit_spec_decode_{name}_at_position", doc, labels=["proposer", "position"]
        )
        for i, count in enumerate(counts):
            family.add_metric([stats.proposer, str(i + 1)], count)
        yield family
