"""`llmkit bench serve`: statistics, arrivals and thresholds against direct computations; the
load generator against the real llmkit server and against a server that fails."""

from __future__ import annotations

import asyncio
import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from llmkit.bench import asserts
from llmkit.bench.load import LoadSpec, arrival_offsets, run_load
from llmkit.bench.prompts import BenchRequest, load_requests, parse_range
from llmkit.bench.stats import percentile, summary
from llmkit.errors import LlmkitError
from tests.serve_helpers import start_server

SCHEMA = Path(__file__).parents[1] / "llmkit" / "bench" / "schemas" / "bench-serve.schema.json"


def test_percentiles_match_numpy_on_a_known_list():
    values = [7.0, 1.0, 3.0, 9.0, 4.0, 4.0, 12.0, 0.5]
    for q in (0, 10, 50, 90, 99, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    stats = summary("x_ms", values, 1e3)
    assert stats["median_x_ms"] == pytest.approx(4000.0)
    assert stats["std_x_ms"] == pytest.approx(float(np.std(values)) * 1e3)
    assert summary("x_ms", [])["p99_x_ms"] is None


@pytest.mark.parametrize("rate,burstiness", [(5.0, 1.0), (40.0, 4.0), (2.0, 0.5)])
def test_arrivals_have_the_requested_rate_and_shape(rate, burstiness):
    offsets = arrival_offsets(20001, rate, burstiness, seed=3)
    gaps = np.diff(offsets)
    assert offsets[0] == 0 and all(g >= 0 for g in gaps)
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.03)
    # gamma(shape k) gaps: coefficient of variation 1/sqrt(k) (1 for Poisson arrivals)
    assert gaps.std() / gaps.mean() == pytest.approx(1 / math.sqrt(burstiness), rel=0.05)
    assert arrival_offsets(50, rate, burstiness, seed=3) == offsets[:50]
    assert arrival_offsets(4, math.inf, 1.0, 0) == [0.0] * 4


def test_thresholds_parse_check_and_refuse():
    t = asserts.parse(["output_throughput>=100", "p99_ttft_ms <= 500", "failed==0"])
    good = {"output_throughput": 120.0, "p99_ttft_ms": 480.0, "failed": 0}
    assert asserts.misses(t, [("", good)]) == []
    bad = {**good, "p99_ttft_ms": 501.0, "output_throughput": None}
    missed = asserts.misses(t, [("rate 2", bad)])
    assert missed == [
        "rate 2: output_throughput = missing, wanted >= 100",
        "rate 2: p99_ttft_ms = 501, wanted <= 500",
    ]
    for text in ("throughput", "x>=fast", ">=3"):
        with pytest.raises(LlmkitError):
            asserts.parse([text])
    with pytest.raises(LlmkitError, match="no metric 'kld'"):
        asserts.check_known(asserts.parse(["kld<=0.1"]), {"failed"})


def test_prompt_sources(tmp_path):
    assert parse_range("64-256", "--input-len") == (64, 256)
    with pytest.raises(LlmkitError):
        parse_range("9-3", "--input-len")
    random = load_requests("random", 50, (4, 9), (2, 3), seed=1, random_vocab=50)
    assert all(4 <= len(r.prompt) <= 9 and max(r.prompt) < 50 for r in random)
    assert load_requests("random", 50, (4, 9), (2, 3), seed=1, random_vocab=50) == random
    share = tmp_path / "sg.json"
    conversation = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "ho"}]
    share.write_text(json.dumps([{"conversations": conversation}, {"conversations": []}]))
    assert load_requests(str(share), 3, (1, 1), (7, 7), 0) == [BenchRequest("hi", 7)] * 3
    lines = tmp_path / "p.jsonl"
    lines.write_text('{"prompt": "a", "max_tokens": 5}\n\n{"prompt": [1, 2]}\n')
    got = load_requests(str(lines), 2, (1, 1), (9, 9), 0)
    assert sorted(map(str, got)) == sorted(
        map(str, [BenchRequest("a", 5), BenchRequest([1, 2], 9)])
    )


@pytest.fixture(scope="module")
def server(tiny_dir, tmp_path_factory):
    srv = start_server(tiny_dir(), tmp_path_factory.mktemp("bench-serve"))
    yield srv
    srv.stop()


def test_counts_match_what_the_server_reports(server):
    before = server.metrics()["llmkit_generation_tokens_total"]
    requests = load_requests("random", 24, (4, 40), (3, 12), seed=2, random_vocab=500)
    spec = LoadSpec(f"http://127.0.0.1:{server.port}", request_rate=200.0, max_concurrency=8,
                    ignore_eos=True, slo_ttft_ms=1e6)  # fmt: skip
    result = run_load(spec, requests)
    assert result["completed"] + result["failed"] == 24 and result["failed"] == 0
    generated = server.metrics()["llmkit_generation_tokens_total"] - before
    assert result["total_output_tokens"] == generated == sum(r.output_len for r in requests)
    assert result["total_input_tokens"] == sum(len(r.prompt) for r in requests)
    assert result["request_goodput"] == pytest.approx(result["request_throughput"])
    import jsonschema

    jsonschema.validate(json.loads(json.dumps(result)), json.loads(SCHEMA.read_text()))


def test_the_cli_exits_3_on_a_missed_threshold_and_0_on_a_pass(server, cli, tmp_path):
    out = tmp_path / "r.json"
    args = ["bench", "serve", "--url", f"http://127.0.0.1:{server.port}", "--num-prompts", "6",
            "--input-len", "8", "--output-len", "4", "--ignore-eos", "--random-vocab-size", "500",
            "-o", out]  # fmt: skip
    passed = cli(*args, "--assert", "completed>=6", "--assert", "failed<=0")
    assert passed.code == 0, passed.err
    missed = cli(*args, "--assert", "output_throughput>=1e12", "--sweep-rates", "50,inf")
    assert missed.code == asserts.THRESHOLD_MISSED
    assert "threshold missed: rate 50.0: output_throughput" in missed.err
    report = json.loads(out.read_text())
    import jsonschema

    jsonschema.validate(report, json.loads(SCHEMA.read_text()))
    assert len(report["sweep"]) == 2 and len(report["asserts"]["missed"]) == 2


class _Flaky(BaseHTTPRequestHandler):
    """Answers in turn: a 500, a stream cut mid-way, an error event, a good stream."""

    count = 0
    lock = threading.Lock()

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        with self.lock:
            kind = _Flaky.count % 4
            _Flaky.count += 1
        if kind == 0:
            self.send_response(500)
            self.end_headers()
            self.wfile.write(b'{"error": {"message": "boom"}}')
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        chunk = {"choices": [{"index": 0, "text": "hi", "finish_reason": None}]}
        self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
        if kind == 1:
            self.wfile.write(b'data: {"choi')  # and the connection drops
            return
        if kind == 2:
            self.wfile.write(b'data: {"error": {"message": "engine failed"}}\n\n')
        usage = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 1}}
        self.wfile.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())

    def log_message(self, *args):
        pass


def test_errors_and_dropped_connections_count_as_failures():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        spec = LoadSpec(f"http://127.0.0.1:{httpd.server_port}", model="m", max_concurrency=1)
        result = run_load(spec, [BenchRequest([1, 2, 3], 4)] * 8)
    finally:
        httpd.shutdown()
    assert (result["completed"], result["failed"]) == (2, 6)
    assert result["total_output_tokens"] == 2
    kinds = " ".join(result["errors"])
    assert "HTTP 500" in kinds and "engine failed" in kinds


class _Models(BaseHTTPRequestHandler):
    """GET /v1/models: one model for the right key, 401 otherwise."""

    def do_GET(self):
        ok = self.headers.get("Authorization") == "Bearer k"
        body = json.dumps({"data": [{"id": "only"}]} if ok else {"error": "no"}).encode()
        self.send_response(200 if ok else 401)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_the_model_is_listed_with_the_api_key_or_refused_in_one_line():
    from llmkit.bench.load import _first_model

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Models)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_port}"
    try:
        assert asyncio.run(_first_model(LoadSpec(url, api_key="k"))) == "only"
        with pytest.raises(LlmkitError, match=r"cannot list the models of .*401.*pass --model"):
            asyncio.run(_first_model(LoadSpec(url, api_key="wrong")))
    finally:
        httpd.shutdown()


def test_the_stream_reader_rejoins_events_split_across_chunks():
    """Chunked framing with events, lines and CRLFs cut at odd places; then a 404 with a
    chunked body."""
    from llmkit.bench.sse_client import HttpStatusError, post_events

    stream = b'data: {"a": 1}\r\n\r\ndata: {"b": 2}\n\n: a comment\n\ndata: [DONE]\n\n'
    pieces = [stream[:3], stream[3:17], stream[17:18], stream[18:40], stream[40:]]
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"
    answers = [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked,
        b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nnope!\r\n0\r\n\r\n",
    ]

    async def serve(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answers.pop(0))
        await writer.drain()
        writer.close()

    async def main():
        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1/completions"
        async with server:
            got = [d async for d in post_events(url, {"x": 1}, {})]
            with pytest.raises(HttpStatusError, match="HTTP 404: nope!"):
                [d async for d in post_events(url, {"x": 1}, {})]
        return got

    assert asyncio.run(main()) == [b'{"a": 1}', b'{"b": 2}', b"[DONE]"]
