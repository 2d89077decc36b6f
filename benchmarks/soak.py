"""Soak `llmkit serve` with valid and hostile traffic, against clean windows of the same
valid traffic on the same server, in the same run.

Model: `small-llama` in bfloat16 (made under --workdir once). The server runs with its
defaults except `--request-timeout 5 --stream-stall-timeout 5` (so slow clients are dropped
within the run) and `--max-queued-requests 32` (so bursts meet the limit). Valid traffic:
`--valid-workers` loops, each sending in turn a completion, a streamed completion and a chat
request (random prompts from a seeded generator, 32 tokens, temperature 0.7), back to back
for the whole run; a 429 is retried after its Retry-After, twice at most, as OpenAI's client
does, and the wait counts in its latency.

The run alternates clean windows (the valid loops alone) and soak windows (beside them
`--hostile-workers` loops and bursts), --windows soak windows in all, with a clean window
before the first and after each: --duration seconds of soak and --clean-seconds of clean
in all. Clean and soak windows take turns within a few minutes, so a change in how busy the
host is (it is shared) reaches both. After each soak window the hostile loops finish what
they hold and the server gets a few seconds to free what they left before the next clean
window counts; a valid request counts in a window only when it starts and ends inside it.

Hostile loops send, picked at random: numbers past their range, wrong types, NaN, JSON
nested 10,000 deep, lone surrogates, 300 prompts, 20 stop strings, n x max_tokens x
logprobs past the answer bound, a 7 MB prompt, non-text chat content, streams dropped
mid-way, streams never read, half-sent headers, bodies cut mid-upload; and every
--burst-interval seconds a burst of 16 requests of n=4 past the queue limit.

Reported: answers in the soak windows by status and code, 5xx (target 0), p99 latency of the
valid requests in the soak windows over the clean windows' (target <= 1.5x) and each soak
window's p99 over the clean windows either side of it (the spread), front-end and engine
RSS after the first soak window (warm-up) and at the end (target: flat; the engine's also
less the KV-cache blocks touched so far, whose pages are committed as the cache fills, up
to its size), KV blocks used once the traffic stops (target 0), and tracebacks in the log;
and, to read the latency ratio by, how many valid requests met a 429 (and the p99 of the
others) and what the engine did in each kind of window (tokens prefilled and generated,
mean TPOT, draft tokens proposed and accepted). Writes benchmarks/results/soak-<date>.json.

With --speculative ngram (or a draft model's directory) the server speculates, with no
--speculative-max-seqs limit, so that every step whose requests allow it carries drafts, in
the soak windows too (under the default limit, their load leaves none): streams dropped
mid-draft, n=4, stop strings and logprobs meet rounds of verification and rollback. Every
other valid request is then greedy (temperature 0), whose drafts small-llama's output, which
soon repeats itself, accepts (sampled drafts it mostly rejects, and the engine soon stops
proposing them). Its result is a variant of its own (soak-speculative-<date>.json, with a
draft model soak-speculative-draft-<date>.json), with a table of its own. The soak's model
may be its own draft (--speculative WORKDIR/small-llama-bf16): nearly every draft
accepted, so that the draft model's cache, its catching up and its rollback run at every step.

    python benchmarks/soak.py [--workdir DIR] [--duration 600] [--clean-seconds 180]
        [--speculative ngram|DRAFT]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import http.client
import json
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from report import row, save_result

from llmkit.net import free_port
from llmkit.serve.launch import launched

HUGE_PROMPT = json.dumps({"prompt": "word " * 1_400_000}).encode()  # 7 MB, made once
DRAIN_S = 6  # after a soak window: held sockets close, aborted requests are freed
WORDS = [
    "the",
    "king",
    "said",
    "once",
    "upon",
    "a",
    "time",
    "a",
    "storm",
    "came",
    "over",
    "where",
    "is",
    "ship",
    "sea",
    "love",
]


class Tally:
    """Thread-safe counts of answers and latencies of the valid requests."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.statuses: collections.Counter = collections.Counter()
        self.codes: collections.Counter = collections.Counter()
        self.valid_latency: list[float] = []
        self.valid_failed: collections.Counter = collections.Counter()  # by status
        self.valid_retried: list[float] = []  # latencies of those served after a 429
        self.by_window: collections.defaultdict = collections.defaultdict(list)

    def answer(self, status: int, body: bytes) -> None:
        code = None
        if status >= 400:
            try:
                code = json.loads(body)["error"].get("code") or json.loads(body)["error"]["type"]
            except (ValueError, KeyError, TypeError):
                code = "not-openai-shape"
        with self.lock:
            self.statuses[status] += 1
            if code:
                self.codes[f"{status} {code}"] += 1

    def valid(self, seconds: float | None, status: int, retried: bool, window: tuple) -> None:
        with self.lock:
            if retried and seconds is not None:
                self.valid_retried.append(seconds)
            if seconds is None:
                self.valid_failed[status] += 1
            else:
                self.valid_latency.append(seconds)
                self.by_window[window].append(seconds)


class Windows:
    """The window the run is in: ("clean" | "soak", index), or None while a soak window's
    traffic drains. Set by the main thread, read by the valid loops."""

    current: tuple[str, int] | None = None


def _post(port: int, path: str, raw: bytes, timeout: float = 120) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", path, raw, {"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


VALID_TEMPERATURE = 0.7


def _prompt(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 64)))


def valid_loop(
    port: int,
    tallies: dict[str, Tally],
    windows: Windows,
    stop: threading.Event,
    seed: int,
    temperatures: tuple[float, ...] = (VALID_TEMPERATURE,),
) -> None:
    """Valid requests back to back, each at the next of `temperatures` in turn; each counts
    in the window it started in, its latency only if it also ended there (not across two
    windows, nor while a soak window drains)."""
    rng = random.Random(seed)
    kinds = ["completion", "stream", "chat"]
    i = 0
    while not stop.is_set():
        kind, temperature = kinds[i % 3], temperatures[i % len(temperatures)]
        i += 1
        body: dict = {"max_tokens": 32, "temperature": temperature, "seed": rng.randint(0, 2**31)}
        if kind == "chat":
            path = "/v1/chat/completions"
            body["messages"] = [{"role": "user", "content": _prompt(rng)}]
        else:
            path = "/v1/completions"
            body["prompt"] = _prompt(rng)
            body["stream"] = kind == "stream"
        window = windows.current
        tally = tallies["clean" if window and window[0] == "clean" else "soak"]
        start = time.perf_counter()
        status, answer, retried = _send_valid(port, path, json.dumps(body).encode(), tally)
        ok = status == 200 and (b"[DONE]" in answer if kind == "stream" else b"choices" in answer)
        if ok and (window is None or windows.current != window):
            continue
        tally.valid(time.perf_counter() - start if ok else None, status, retried, window)


def _send_valid(port: int, path: str, raw: bytes, tally: Tally) -> tuple[int, bytes, bool]:
    """As OpenAI's client does: a 429 is retried after its Retry-After, twice at most (the
    wait counts in the request's latency). Also says whether it was retried."""
    for attempt in range(3):
        try:
            status, answer = _post(port, path, raw)
        except OSError:
            return 0, b"", attempt > 0
        tally.answer(status, answer)
        if status != 429:
            break
        time.sleep(1)  # the server's Retry-After
    return status, answer, attempt > 0


def _raw(port: int, data: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(data)
    return sock


def _head(length: int, path: str = "/v1/completions") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


def hostile_request(port: int, tally: Tally, rng: random.Random) -> None:
    """One hostile request or connection, picked at random."""
    bodies = [
        {"prompt": "x", "top_k": 10**20},
        {"prompt": "x", "seed": 2**70},
        {"prompt": "x", "max_tokens": "5"},
        {"prompt": "x", "n": True},
        {"prompt": ["a"] * 300},
        {"prompt": "x", "stop": ["a"] * 20},
        {"prompt": "x", "n": 128, "max_tokens": 2000, "logprobs": 20},
        {"messages": [{"role": "user", "content": [{"type": "image"}]}]},
    ]
    kind = rng.randrange(len(bodies) + 8)
    if kind < len(bodies):
        path = "/v1/chat/completions" if "messages" in bodies[kind] else "/v1/completions"
        tally.answer(*_post(port, path, json.dumps(bodies[kind]).encode()))
    elif kind == len(bodies):
        tally.answer(*_post(port, "/v1/completions", b"[" * 10000 + b"]" * 10000))
    elif kind == len(bodies) + 1:
        tally.answer(*_post(port, "/v1/completions", b'{"prompt": "\\udc00 NaN"}'))
    elif kind == len(bodies) + 2:
        tally.answer(*_post(port, "/v1/completions", b'{"prompt": "a", "top_p": NaN}'))
    elif kind == len(bodies) + 3:
        tally.answer(*_post(port, "/v1/completions", HUGE_PROMPT))
    elif kind == len(bodies) + 4:  # a stream dropped part-way
        body = json.dumps({"prompt": "x", "max_tokens": 200, "stream": True}).encode()
        sock = _raw(port, _head(len(body)) + body)
        sock.recv(2048)
        sock.close()
    elif kind == len(bodies) + 5:  # a stream never read, held for a while
        body = {"prompt": "x", "n": 4, "max_tokens": 300, "logprobs": 5, "stream": True}
        raw = json.dumps(body).encode()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", port))
        sock.sendall(_head(len(raw)) + raw)
        time.sleep(8)
        sock.close()
    elif kind == len(bodies) + 6:  # half-sent headers, held past the request timeout
        sock = _raw(port, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        time.sleep(6)
        sock.close()
    else:  # a body cut mid-upload
        sock = _raw(port, _head(1000) + b'{"prompt": "')
        time.sleep(0.1)
        sock.close()


def burst_loop(port: int, tally: Tally, stop: threading.Event, interval_s: float) -> None:
    """Every `interval_s`, 16 requests of n=4 at once: past the queue limit of 32 sequences,
    so some are answered 429."""
    burst = json.dumps({"prompt": "x", "n": 4, "max_tokens": 4}).encode()
    while not stop.wait(interval_s):
        threads = [
            threading.Thread(target=lambda: tally.answer(*_post(port, "/v1/completions", burst)))
            for _ in range(16)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()


def hostile_loop(port: int, tally: Tally, stop: threading.Event, seed: int) -> None:
    rng = random.Random(seed)
    while not stop.is_set():
        with contextlib.suppress(OSError):  # the server closing a hostile connection is the point
            hostile_request(port, tally, rng)


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _memory(port: int, pid: int, engine: int) -> dict[str, int]:
    """RSS of the front end and the engine, and the engine's less the KV-cache blocks it has
    touched so far (their pages are committed on first use, up to the whole cache: that
    growth is the cache filling, not a leak)."""
    touched = _metric(port, "llmkit_kv_cache_touched_blocks")
    kv = int(touched * _metric(port, "llmkit_kv_cache_block_bytes"))
    rss = _rss(engine)
    return {"front_end": _rss(pid), "engine": rss, "engine_beyond_kv": rss - kv, "kv_touched": kv}


ENGINE_COUNTERS = {
    "prompt_tokens": "llmkit_prompt_tokens_total",
    "generation_tokens": "llmkit_generation_tokens_total",
    "tpot_sum": "llmkit_time_per_output_token_seconds_sum",
    "tpot_count": "llmkit_time_per_output_token_seconds_count",
    "proposed": "llmkit_spec_decode_proposed_tokens_total",  # none without --speculative
    "accepted": "llmkit_spec_decode_accepted_tokens_total",
}


def _engine_counters(port: int) -> collections.Counter:
    return collections.Counter({k: _metric(port, name) for k, name in ENGINE_COUNTERS.items()})


def _engine_work(counts: collections.Counter) -> dict[str, float]:
    """What the engine did in a kind of window, hostile requests included: tokens prefilled
    and generated, the mean time per output token, and draft tokens proposed and accepted."""
    return {
        "prompt_tokens": counts["prompt_tokens"],
        "generation_tokens": counts["generation_tokens"],
        "draft_tokens_proposed": counts["proposed"],
        "draft_tokens_accepted": counts["accepted"],
        "mean_tpot_s": counts["tpot_sum"] / counts["tpot_count"] if counts["tpot_count"] else 0.0,
    }


def _engine_pid(pid: int) -> int:
    (child,) = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return int(child)


def _metric(port: int, name: str) -> float:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def run(model: Path, args: argparse.Namespace, log: Path) -> dict:
    """One server; the valid loops throughout, hostile loops and bursts in the soak windows;
    what the report needs."""
    port = free_port()
    options = ["--request-timeout", "5", "--stream-stall-timeout", "5"]
    options += ["--max-queued-requests", "32", "--log-level", "warning"]
    temperatures = (VALID_TEMPERATURE,)
    if args.speculative:  # every step that may speculate does, whatever the load
        options += ["--speculative", args.speculative, "--speculative-max-seqs", "100000"]
        temperatures = (0.0, VALID_TEMPERATURE)  # greedy ones too: drafts accepted
    command = [sys.executable, "-m", "llmkit", "serve", str(model), "--port", str(port), *options]
    tallies = {"clean": Tally(), "soak": Tally()}
    windows = Windows()
    work = {"clean": collections.Counter(), "soak": collections.Counter()}

    def window(label: tuple[str, int], seconds: float) -> None:
        before = _engine_counters(port)
        windows.current = label
        time.sleep(seconds)
        windows.current = None
        work[label[0]].update(_engine_counters(port) - before)

    with log.open("w") as out, launched(command, port, log=out):
        pid = server_pid(port)
        engine = _engine_pid(pid)
        _post(port, "/v1/completions", b'{"prompt": "warm up", "max_tokens": 8}')
        stop = threading.Event()
        valid = [
            threading.Thread(
                target=valid_loop, args=(port, tallies, windows, stop, i, temperatures)
            )
            for i in range(args.valid_workers)
        ]
        for t in valid:
            t.start()
        clean_s = args.clean_seconds / (args.windows + 1)
        window(("clean", 0), clean_s)
        for i in range(args.windows):
            with hostile_traffic(port, tallies["soak"], args, seed=1000 * (i + 1)):
                window(("soak", i), args.duration / args.windows)
            time.sleep(DRAIN_S)
            if i == 0:
                start_rss = _memory(port, pid, engine)  # the allocators' pools have filled
            window(("clean", i + 1), clean_s)
        stop.set()
        for t in valid:
            t.join()
        time.sleep(DRAIN_S)
        end_rss = _memory(port, pid, engine)
        blocks = _metric(port, "llmkit_kv_cache_used_blocks")
    clean = _phase(tallies["clean"], work["clean"], args.clean_seconds)
    soak = _phase(tallies["soak"], work["soak"], args.duration)
    soak.update(
        rss_start=start_rss,
        rss_end=end_rss,
        kv_blocks_used_at_end=blocks,
        tracebacks_in_log=log.read_text().count("Traceback"),
    )
    return {"clean": clean, "soak": soak, "windows": _spread(tallies, args.windows)}


@contextlib.contextmanager
def hostile_traffic(port: int, tally: Tally, args: argparse.Namespace, seed: int):
    """Hostile loops and bursts while in the block; at its end they finish what they hold."""
    stop = threading.Event()
    loops = [
        threading.Thread(target=hostile_loop, args=(port, tally, stop, seed + i))
        for i in range(args.hostile_workers)
    ]
    loops.append(threading.Thread(target=burst_loop, args=(port, tally, stop, args.burst_interval)))
    for t in loops:
        t.start()
    try:
        yield
    finally:
        stop.set()
        for t in loops:
            t.join()


def _phase(tally: Tally, work: collections.Counter, seconds: float) -> dict:
    latencies = sorted(tally.valid_latency)
    return {
        "seconds": seconds,
        "statuses": dict(tally.statuses),
        "errors_by_code": dict(tally.codes),
        "valid_served": len(latencies),
        "valid_failed": dict(tally.valid_failed),
        "valid_retried_after_429": len(tally.valid_retried),
        "valid_p99_never_429_s": _p99(_without(latencies, tally.valid_retried)),
        "valid_p50_s": statistics.median(latencies) if latencies else None,
        "valid_p99_s": _p99(latencies),
        "engine_work": _engine_work(work),
    }


def _spread(tallies: dict[str, Tally], num_windows: int) -> list[dict]:
    """Each soak window's valid p99 over that of the clean windows before and after it."""
    out = []
    for i in range(num_windows):
        soak = tallies["soak"].by_window[("soak", i)]
        clean = [*tallies["clean"].by_window[("clean", i)]]
        clean += tallies["clean"].by_window[("clean", i + 1)]
        ratio = _p99(soak) / _p99(clean) if soak and clean else None
        out.append({
            "soak_served": len(soak), "clean_served": len(clean),
            "soak_p99_s": _p99(soak), "clean_p99_s": _p99(clean), "ratio": ratio,
        })  # fmt: skip
    return out


def _p99(latencies: list[float]) -> float | None:
    return sorted(latencies)[int(0.99 * (len(latencies) - 1))] if latencies else None


def _without(values: list[float], drop: list[float]) -> list[float]:
    left = collections.Counter(values)
    left.subtract(drop)
    return list(left.elements())


def server_pid(port: int) -> int:
    """The pid listening on `port` (the `llmkit serve` front end)."""
    out = subprocess.run(["ss", "-ltnpH", f"sport = :{port}"], capture_output=True, text=True)
    return int(out.stdout.split("pid=")[1].split(",")[0])


def main() -> None:
    args = parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="llmkit-soak-"))
    model = work / "small-llama-bf16"
    if not model.exists():
        init = [sys.executable, "-m", "llmkit", "init", str(model), "--preset", "small-llama"]
        subprocess.run([*init, "--dtype", "bfloat16"], check=True)
    report(run(model, args, work / "soak.log"), args)


def report(result: dict, args: argparse.Namespace) -> None:
    clean, soak, spread = result["clean"], result["soak"], result["windows"]
    fives = sum(n for status, n in soak["statuses"].items() if status >= 500)
    ratio = soak["valid_p99_s"] / clean["valid_p99_s"]
    growth = {k: soak["rss_end"][k] / soak["rss_start"][k] for k in ("front_end", "engine")}
    growth["engine_beyond_kv"] = (
        soak["rss_end"]["engine_beyond_kv"] / soak["rss_start"]["engine_beyond_kv"]
    )
    print(f"soak: {sum(soak['statuses'].values())} answers, {soak['valid_served']} valid served")
    for code, n in sorted(soak["errors_by_code"].items()):
        print(f"  {code}: {n}")
    print(f"5xx: {fives} (target 0); valid failed, by status: {soak['valid_failed']}")
    print(f"valid served after a 429: {soak['valid_retried_after_429']}; p99 of the others "
          f"{soak['valid_p99_never_429_s']:.3f} s")  # fmt: skip
    print(f"valid p99: {soak['valid_p99_s']:.3f} s against clean {clean['valid_p99_s']:.3f} s "
          f"= {ratio:.2f}x (target <= 1.5x)")  # fmt: skip
    print("each soak window's p99 over its clean neighbours': " + ", ".join(
        f"{w['soak_p99_s']:.2f}/{w['clean_p99_s']:.2f} s = {w['ratio']:.2f}x"
        for w in spread if w["ratio"]
    ))  # fmt: skip
    for name, phase_ in (("clean", clean), ("soak", soak)):
        work = phase_["engine_work"]
        print(f"engine, {name}: {work['prompt_tokens']:.0f} prompt and "
              f"{work['generation_tokens']:.0f} generated tokens, "
              f"mean TPOT {work['mean_tpot_s'] * 1e3:.1f} ms, draft tokens "
              f"{work['draft_tokens_accepted']:.0f} accepted of "
              f"{work['draft_tokens_proposed']:.0f}")  # fmt: skip
    for k in ("front_end", "engine", "engine_beyond_kv", "kv_touched"):
        print(f"{k}: {soak['rss_start'][k] / 2**20:.0f} -> {soak['rss_end'][k] / 2**20:.0f} MB")
    print(f"KV blocks used at the end: {soak['kv_blocks_used_at_end']:.0f} (target 0); "
          f"tracebacks in the log: {soak['tracebacks_in_log']}")  # fmt: skip
    fields = {
        "ratios": {"valid_p99_soak_over_clean": ratio},
        "five_xx": fives,
        "rss_growth": growth,
        "clean": clean,
        "soak": soak,
        "windows": spread,
    }
    save_result(
        "soak",
        fields,
        anchor="clean windows of the same valid traffic on the same server",
        summary=summarize(fields),
        variant=_variant(args.speculative),
    )


def _variant(speculative: str | None) -> str:
    """The result's variant: none, speculative (ngram), speculative-draft (a draft model)."""
    if speculative is None:
        return ""
    return "speculative" if speculative == "ngram" else "speculative-draft"


FLAT = 1.1  # RSS at the end over RSS after warm-up that still counts as flat


def summarize(fields: dict) -> list[dict]:
    """RESULTS.md's rows: answers, 5xx, valid failures, p99 against the clean windows, RSS,
    KV."""
    clean, soak = fields["clean"], fields["soak"]
    ratio, growth = fields["ratios"]["valid_p99_soak_over_clean"], fields["rss_growth"]
    answers = ", ".join(f"{n} × {status}" for status, n in soak["statuses"].items())
    failed = sum(soak["valid_failed"].values())
    mb = {k: (soak["rss_start"][k] / 2**20, soak["rss_end"][k] / 2**20) for k in growth}
    rows = [
        row("answers in the soak, by status", answers, "", None),
        row("5xx answers", str(fields["five_xx"]), "", None, "0", fields["five_xx"] == 0),
        row("valid requests failed", str(failed), "", None, "0", failed == 0),
        row(
            "valid requests' p99 latency, soak windows against clean (lower is better)",
            f"{soak['valid_p99_s']:.2f} s",
            f"{clean['valid_p99_s']:.2f} s",
            ratio,
            "≤ 1.5×",
            ratio <= 1.5,
        ),
    ]
    drafts = {k: (p["engine_work"].get("draft_tokens_accepted", 0),
                  p["engine_work"].get("draft_tokens_proposed", 0))
              for k, p in (("soak", soak), ("clean", clean))}  # fmt: skip
    if drafts["soak"][1] or drafts["clean"][1]:  # --speculative: that the soak speculated
        rows.append(row(
            "draft tokens accepted of those proposed (the engine's counters), soak windows "
            "against clean", *(f"{a:.0f} of {n:.0f}" for a, n in drafts.values()), None,
        ))  # fmt: skip
    each = [w["ratio"] for w in fields["windows"] if w["ratio"]]
    if each:
        rows.append(row(
            "each soak window's p99 over its clean neighbours'",
            ", ".join(f"{r:.2f}×" for r in each), "", None,
        ))  # fmt: skip
    for key, name in (("front_end", "front-end RSS"), ("engine_beyond_kv", "engine RSS less KV")):
        start, end = mb[key]
        rows.append(row(
            f"{name}, after warm-up → end", f"{start:.0f} → {end:.0f} MB", "", None,
            f"flat (≤ {FLAT}×)", growth[key] <= FLAT,
        ))  # fmt: skip
    used, tracebacks = soak["kv_blocks_used_at_end"], soak["tracebacks_in_log"]
    rows.append(row("KV blocks used at the end", f"{used:.0f}", "", None, "0", used == 0))
    rows.append(row("tracebacks in the log", str(tracebacks), "", None, "0", tracebacks == 0))
    return rows


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", help="keep the model and the server logs here")
    parser.add_argument("--duration", type=float, default=600, help="seconds of soak windows")
    parser.add_argument("--clean-seconds", type=float, default=180, help="of clean windows")
    parser.add_argument("--windows", type=int, default=5, help="soak windows")
    parser.add_argument("--valid-workers", type=int, default=4)
    parser.add_argument("--hostile-workers", type=int, default=4)
    parser.add_argument("--burst-interval", type=float, default=10, help="seconds between bursts")
    parser.add_argument("--speculative", help="ngram or a draft model: the server speculates")
    return parser.parse_args()


if __name__ == "__main__":
    main()
