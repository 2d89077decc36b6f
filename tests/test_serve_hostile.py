"""`llmkit serve` under hostile and careless clients: no request can fail, stall or starve
another, and bad input is a 4xx in OpenAI's error shape with no traceback in the log."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from tests.serve_helpers import start_server

BLOCKS = "llmkit_kv_cache_used_blocks"


@pytest.fixture(scope="module")
def server(tiny_dir, tmp_path_factory):
    srv = start_server(
        tiny_dir(),
        tmp_path_factory.mktemp("hostile"),
        "--request-timeout",
        "1",
        "--stream-stall-timeout",
        "1",
        "--max-connections",
        "40",
        "--max-queued-requests",
        "8",
        "--max-num-seqs",
        "4",
    )
    yield srv
    assert srv.stop() == 0
    assert "Traceback" not in srv.log.read_text()


def _completion(server, body: dict) -> tuple[int, dict]:
    status, _, answer = server.request("POST", "/v1/completions", body)
    return status, answer


def _error(server, body: dict, param: str | None, status: int = 400) -> str:
    got, answer = _completion(server, body)
    assert got == status, answer
    assert set(answer["error"]) == {"message", "type", "param", "code"}
    assert answer["error"]["param"] == param
    return answer["error"]["message"]


@pytest.mark.parametrize(
    "field,value",
    [("top_k", 10**20), ("seed", 1180591620717411303424), ("seed", -(2**64)), ("priority", 2**40)],
)
def test_numbers_past_what_the_engine_takes_are_400_naming_the_field(server, field, value):
    _error(server, {"prompt": "x", field: value}, field)


def test_the_largest_numbers_allowed_run(server):
    for extra in ({"top_k": 2**31 - 1}, {"seed": 2**63 - 1, "n": 2}, {"seed": -(2**63), "n": 2}):
        status, answer = _completion(server, {"prompt": "x", "max_tokens": 3, **extra})
        assert status == 200, answer


@pytest.mark.parametrize(
    "body,param",
    [
        ({"prompt": "x", "max_tokens": "5"}, "max_tokens"),
        ({"prompt": "x", "n": True}, "n"),
        ({"prompt": "x", "temperature": "0"}, "temperature"),
        ({"prompt": "x", "stream": 1}, "stream"),
    ],
)
def test_wrong_types_are_refused_not_coerced(server, body, param):
    _error(server, body, param)


def test_null_for_a_field_with_a_default_is_that_default_and_for_a_required_one_400(server):
    """As OpenAI's API and vLLM take it (OpenAI's client sends null for temperature=None)."""
    body = {"prompt": "x", "max_tokens": 4, "seed": 3}
    nulls = dict.fromkeys(["temperature", "top_p", "top_k", "min_p", "n", "stream", "echo",
                           "presence_penalty", "frequency_penalty", "repetition_penalty",
                           "ignore_eos", "speculative", "priority", "logprobs",
                           "stop"])  # fmt: skip
    plain, with_nulls = (_completion(server, b) for b in (body, {**body, **nulls}))
    assert plain[0] == with_nulls[0] == 200, with_nulls
    assert plain[1]["choices"] == with_nulls[1]["choices"]
    _error(server, {"prompt": None}, "prompt")
    status, _, answer = server.request("POST", "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "logprobs": None,
        "parallel_tool_calls": None, "stream_options": {"include_usage": None}})  # fmt: skip
    assert status == 200, answer


def test_per_request_work_is_bounded(server):
    assert "16" in _error(server, {"prompt": "x", "stop": ["a"] * 17}, "stop")
    assert "256" in _error(server, {"prompt": "x", "stop": ["a" * 257]}, "stop")
    assert "at most 256 prompts" in _error(server, {"prompt": ["a"] * 257}, "prompt")
    body = {"prompt": "x", "n": 128, "max_tokens": 400, "logprobs": 20}
    assert "--max-response-entries" in _error(server, body, "max_tokens")


def test_malformed_json_is_400(server):
    deep = b"[" * 10000 + b"]" * 10000
    for raw in (deep, b'{"prompt": "\\udc00"}', b'{"prompt": "a", "temperature": NaN}'):
        status, _, answer = server.request("POST", "/v1/completions", raw=raw)
        assert status == 400 and answer["error"]["type"] == "invalid_request_error"


def test_a_huge_prompt_is_refused_before_it_is_tokenized_and_health_stays_fast(server):
    body = json.dumps({"prompt": "word " * 1_400_000}).encode()  # 7 MB
    result = {}

    def post() -> None:
        result["answer"] = server.request("POST", "/v1/completions", raw=body)

    thread = threading.Thread(target=post)
    start = time.monotonic()
    thread.start()
    while thread.is_alive():
        t = time.monotonic()
        assert server.request("GET", "/health")[0] == 200
        assert time.monotonic() - t < 1.0
    assert time.monotonic() - start < 10
    status, _, answer = result["answer"]
    assert status == 400 and answer["error"]["code"] == "context_length_exceeded"


def test_the_queue_limit_counts_sequences_not_requests(server):
    # 4 run, 8 may wait: a single request of n=16 is more than the queue takes
    status, _, answer = server.request(
        "POST", "/v1/completions", {"prompt": "x", "n": 16, "max_tokens": 2}
    )
    assert status == 429 and answer["error"]["code"] == "queue_full"


def test_an_unbounded_default_queue_is_derived_from_the_kv_cache(tiny_dir, tmp_path):
    # 8 blocks of 16 tokens: by default at most 8 sequences may wait
    srv = start_server(tiny_dir(), tmp_path, "--kv-cache-memory", "64KiB")
    try:
        assert "KV cache: 8 blocks" in srv.log.read_text()
        body = {"prompt": "x", "n": 9, "max_tokens": 2}
        status, _, answer = srv.request("POST", "/v1/completions", body)
        assert status == 429, answer
        body["n"] = 2
        assert srv.request("POST", "/v1/completions", body)[0] == 200
    finally:
        srv.stop()


def _raw_connection(server, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", server.port))
    return sock


def _answer(sock: socket.socket) -> bytes:
    """What the server sends on `sock` until its body is complete (Content-Length)."""
    sock.settimeout(10)
    data = b""
    while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < _length(data):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    sock.close()
    return data


def _length(data: bytes) -> int:
    head = data.split(b"\r\n\r\n", 1)[0].lower()
    return int(head.split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])


def _wait_for(predicate, timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def _stream_raw(server, body: dict, rcvbuf: int = 4096) -> socket.socket:
    """A streamed completion on a connection whose client reads only when told to."""
    raw = json.dumps({**body, "stream": True}).encode()
    sock = _raw_connection(server, rcvbuf)
    head = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    sock.sendall(f"{head}Content-Length: {len(raw)}\r\n\r\n".encode() + raw)
    return sock


LONG = {"prompt": "x", "max_tokens": 450, "logprobs": 5, "ignore_eos": True}


def test_a_stream_whose_client_stops_reading_is_paused_then_ended_and_others_go_on(server):
    sock = _stream_raw(server, {**LONG, "n": 8})
    try:
        # paused (no steps, no KV blocks) once the socket's buffers are full ...
        assert _wait_for(lambda: server.metrics()["llmkit_requests_paused"] == 8, timeout=10)
        # ... then ended once it has read nothing for --stream-stall-timeout
        assert _wait_for(lambda: "read nothing for 1 s" in server.log.read_text())
        status, answer = _completion(server, {"prompt": "x", "max_tokens": 4, "ignore_eos": True})
        assert status == 200 and answer["choices"][0]["finish_reason"] == "length"
        assert _wait_for(lambda: server.metrics()[BLOCKS] == 0)
        assert server.metrics()["llmkit_requests_paused"] == 0
    finally:
        sock.close()


def test_a_slow_reader_is_paused_and_resumed_and_loses_nothing(server):
    body = {**LONG, "temperature": 0, "n": 2}
    status, whole = _completion(server, body)
    assert status == 200
    sock = _stream_raw(server, body, rcvbuf=16384)
    # reads nothing until the buffers are full and the engine pauses both sequences, however
    # fast or slow it runs: the stall timeout counts only from then
    assert _wait_for(lambda: server.metrics()["llmkit_requests_paused"] == 2)
    data, chunk = b"", b"-"
    sock.settimeout(10)
    while chunk and not data.endswith(b"0\r\n\r\n"):  # the chunked body's end
        data += (chunk := sock.recv(65536))
        time.sleep(0.2)  # reads now and then, often enough to stay within the stall timeout
    sock.close()
    assert data.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")
    texts = ["", ""]
    for line in data.split(b"\n"):
        if line.startswith(b"data: {"):
            for choice in json.loads(line[6:])["choices"]:
                texts[choice["index"]] += choice["text"]
    assert texts == [c["text"] for c in whole["choices"]]


def test_half_sent_requests_are_closed_after_the_request_timeout(server):
    socks = [_raw_connection(server) for _ in range(10)]
    for sock in socks:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # headers never end
    time.sleep(2)
    for sock in socks:
        sock.settimeout(5)
        assert sock.recv(100) == b""  # closed by the server
        sock.close()
    assert "sent no whole request in 1 s" in server.log.read_text()


def test_a_body_that_never_arrives_is_408(server):
    sock = _raw_connection(server)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
    answer = _answer(sock)
    assert answer.startswith(b"HTTP/1.1 408") and b'"code":"timeout"' in answer


def test_a_client_gone_mid_upload_is_one_log_line(server):
    before = server.log.read_text().count("disconnected while sending")
    for _ in range(3):
        sock = _raw_connection(server)
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{")
        time.sleep(0.1)
        sock.close()
    assert _wait_for(
        lambda: server.log.read_text().count("disconnected while sending") == before + 3
    )


def test_connections_past_the_cap_get_503_in_openai_shape(server):
    socks = [_raw_connection(server) for _ in range(40)]
    try:
        answer = _answer(_raw_connection(server))
        assert answer.startswith(b"HTTP/1.1 503") and b'"code":"too_many_connections"' in answer
    finally:
        for sock in socks:
            sock.close()
    assert _wait_for(lambda: server.request("GET", "/health")[0] == 200)


def test_openapi_needs_the_key_and_nothing_shows_the_path(tiny_dir, tmp_path):
    model = tiny_dir()
    srv = start_server(model, tmp_path, "--api-key", "k")
    try:
        assert srv.request("GET", "/openapi.json")[0] == 401
        key = {"Authorization": "Bearer k"}
        assert srv.request("GET", "/openapi.json", headers=key)[0] == 200
        status, _, answer = srv.request("GET", "/v1/models", headers=key)
        assert status == 200 and str(model) not in json.dumps(answer)
        assert answer["data"][0]["id"] == model.name
        status, _, answer = srv.request(
            "POST", "/v1/completions", {"model": "x", "prompt": "a"}, key
        )
        assert status == 404 and str(model) not in json.dumps(answer)
        body = {"model": str(model), "prompt": "a", "max_tokens": 1}  # the path as typed still
        assert srv.request("POST", "/v1/completions", body, key)[0] == 200
    finally:
        srv.stop()


def test_shutdown_past_its_timeout_ends_streams_with_an_error_and_waiting_requests_503(
    tiny_dir, tmp_path
):
    srv = start_server(tiny_dir(), tmp_path, "--shutdown-timeout", "0.5", "--max-num-seqs", "1")
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=60)
    # 8 x 500 tokens, one sequence at a time: seconds, far past the timeout
    body = {"prompt": "x", "n": 8, "max_tokens": 500, "stream": True, "ignore_eos": True}
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    stream = conn.getresponse()
    assert stream.readline().startswith(b"data: ")
    waiting = {}
    thread = threading.Thread(
        target=lambda: waiting.update(
            r=srv.request("POST", "/v1/completions", {"prompt": "y", "max_tokens": 5})
        )
    )
    thread.start()
    time.sleep(0.3)
    srv.process.send_signal(signal.SIGTERM)
    rest = stream.read()
    thread.join(30)
    assert srv.process.wait(60) == 0
    events = [e for e in rest.split(b"\n\n") if e.strip()]
    assert events[-1] == b"data: [DONE]" and b'"type":"server_error"' in events[-2]
    status, _, answer = waiting["r"]
    assert status == 503 and answer["error"]["type"] == "server_error"
    log = srv.log.read_text()
    assert "Traceback" not in log and "shutdown timeout: ended 2 requests" in log


def _serve(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "llmkit", "serve", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def test_a_busy_port_and_a_bad_port_are_one_error_line_and_exit_1(tiny_dir):
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        busy = _serve(tiny_dir(), "--port", port)
    finally:
        holder.close()
    bad = _serve(tiny_dir(), "--port", "70000")
    for result, says in ((busy, "cannot listen on 127.0.0.1"), (bad, "--port 70000")):
        errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert len(errors) == 1 and errors[0].startswith("error:") and says in errors[0]
