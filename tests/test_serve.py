"""`llmkit serve` as a real process, driven with the official openai client and raw HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from llmkit.net import free_port
from llmkit.runtime.engine import LLM, EngineConfig
from llmkit.runtime.sequence import SamplingParams
from tests.runtime_helpers import random_prompts
from tests.serve_helpers import start_server, wait_healthy

openai = pytest.importorskip("openai")

PROMPTS = ["The king said", "Once upon a time", "A storm came over the", "Where is the"]


@pytest.fixture(scope="module")
def model(tiny_dir):
    return tiny_dir()


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    srv = start_server(model, tmp_path_factory.mktemp("serve"), "--stats-interval", "1")
    yield srv
    assert srv.stop() == 0


@pytest.fixture(scope="module")
def client(server):
    return server.client()


@pytest.fixture(scope="module")
def offline(model):
    llm = LLM(model, EngineConfig())
    yield llm
    llm.close()


def test_models_and_health(server, client, model):
    assert [m.id for m in client.models.list().data] == [model.name]
    assert server.request("GET", "/health")[:1] == (200,)


def test_completions_equal_offline_greedy(client, offline, model):
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    expected = offline.generate(PROMPTS, params)
    got = client.completions.create(
        model=str(model),
        prompt=PROMPTS,
        max_tokens=12,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert [c.index for c in got.choices] == [0, 1, 2, 3]
    assert [c.text for c in got.choices] == [e.outputs[0].text for e in expected]
    assert got.usage.prompt_tokens == sum(len(e.prompt_token_ids) for e in expected)
    assert got.usage.completion_tokens == 4 * 12
    assert {c.finish_reason for c in got.choices} == {"length"}


def test_chat_stream_sends_text_in_its_first_chunk_and_equals_the_whole_answer(client, model):
    messages = [{"role": "user", "content": "Tell me of the sea."}]
    whole = client.chat.completions.create(
        model=str(model), messages=messages, max_tokens=16, temperature=0
    )
    chunks = list(
        client.chat.completions.create(
            model=str(model),
            messages=messages,
            max_tokens=16,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    first = chunks[0].choices[0].delta
    assert first.role == "assistant" and first.content
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    # only the last chunk finishes (a tiny model may finish before the first chunk is sent,
    # whose delta then holds the whole answer)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == whole.choices[0].finish_reason and set(finishes[:-1]) <= {None}


def test_n_choices_and_seeds(client, model):
    def run(seed: int):
        out = client.completions.create(
            model=str(model), prompt=PROMPTS[0], max_tokens=10, temperature=1.0, n=2, seed=seed
        )
        return [c.text for c in sorted(out.choices, key=lambda c: c.index)]

    first = run(7)
    assert len(first) == 2 and first[0] != first[1]
    assert run(7) == first  # seeded: reproducible
    assert run(8) != first


def test_stop_strings_are_never_streamed(client, model):
    plain = (
        client.completions.create(model=str(model), prompt=PROMPTS[1], max_tokens=24, temperature=0)
        .choices[0]
        .text
    )
    stop = plain[len(plain) // 2 : len(plain) // 2 + 3]
    whole = client.completions.create(
        model=str(model), prompt=PROMPTS[1], max_tokens=24, temperature=0, stop=[stop]
    ).choices[0]
    streamed = client.completions.create(
        model=str(model), prompt=PROMPTS[1], max_tokens=24, temperature=0, stop=[stop], stream=True
    )
    text = "".join(c.choices[0].text for c in streamed)
    assert whole.finish_reason == "stop" and stop not in whole.text
    assert plain.startswith(whole.text) and text == whole.text


def test_logprobs_and_echo(client, model, offline):
    prompt = random_prompts(1, 10, 11, seed=3)[0]
    out = client.completions.create(
        model=str(model), prompt=prompt, max_tokens=4, temperature=0, logprobs=2, echo=True
    ).choices[0]
    lp = out.logprobs
    assert len(lp.tokens) == len(prompt) + 4 and lp.token_logprobs[0] is None
    reference = offline.generate(
        [prompt], SamplingParams(max_tokens=4, temperature=0, logprobs=2, prompt_logprobs=2)
    )[0]
    expected = [e["logprob"] for e in reference.prompt_logprobs[1:]]
    expected += [e["logprob"] for e in reference.outputs[0].logprobs]
    assert lp.token_logprobs[1:] == pytest.approx(expected, abs=1e-5)
    generated = zip(lp.token_logprobs[len(prompt) :], lp.top_logprobs[len(prompt) :], strict=True)
    for value, top in generated:
        assert max(top.values()) == pytest.approx(value)  # greedy: the chosen token is the best
    assert lp.text_offset == sorted(lp.text_offset)
    chat = client.chat.completions.create(
        model=str(model),
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=3,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    ).choices[0]
    assert len(chat.logprobs.content) == 3
    assert all(len(t.top_logprobs) == 3 for t in chat.logprobs.content)


def test_metrics_parse_and_move(server, client, model):
    before = server.metrics()
    client.completions.create(model=str(model), prompt=PROMPTS[2], max_tokens=5, temperature=0)
    after = server.metrics()
    assert after["llmkit_generation_tokens_total"] - before["llmkit_generation_tokens_total"] == 5
    assert after["llmkit_prompt_tokens_total"] > before["llmkit_prompt_tokens_total"]
    assert (
        after["llmkit_time_to_first_token_seconds_count"]
        == before["llmkit_time_to_first_token_seconds_count"] + 1
    )
    for name in (
        "llmkit_requests_running",
        "llmkit_requests_waiting",
        "llmkit_kv_cache_usage",
        "llmkit_preemptions_total",
        "llmkit_inter_token_latency_seconds_count",
        "llmkit_e2e_request_latency_seconds_count",
        "llmkit_request_queue_time_seconds_count",
    ):
        assert name in after


def test_fifty_concurrent_streams_equal_offline_greedy(server, model, offline):
    prompts = random_prompts(50, 4, 60, seed=11)
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    expected = [o.outputs[0].text for o in offline.generate(prompts, params)]

    async def one(client, prompt) -> str:
        stream = await client.completions.create(
            model=str(model),
            prompt=prompt,
            max_tokens=20,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        return "".join([c.choices[0].text async for c in stream])

    async def main() -> list[str]:
        async with openai.AsyncOpenAI(base_url=server.base_url, api_key="x", max_retries=0) as c:
            return await asyncio.gather(*(one(c, p) for p in prompts))

    assert asyncio.run(main()) == expected


def _open_stream(server, max_tokens: int) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    body = {"prompt": "Once", "max_tokens": max_tokens, "stream": True, "ignore_eos": True}
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    assert response.readline().startswith(b"data: ")  # the first event: the request runs
    return response


def test_clients_that_disconnect_free_their_blocks(server):
    aborts = "llmkit_requests_total{finish_reason=abort}"
    before = server.metrics().get(aborts, 0)
    streams = [_open_stream(server, 400) for _ in range(20)]
    assert server.metrics()["llmkit_kv_cache_used_blocks"] > 0
    for response in streams:
        response.fp.raw._sock.shutdown(socket.SHUT_RDWR)
        response.close()
    deadline = time.monotonic() + 10
    while server.metrics()["llmkit_kv_cache_used_blocks"] and time.monotonic() < deadline:
        time.sleep(0.05)
    after = server.metrics()
    assert after["llmkit_kv_cache_used_blocks"] == 0
    assert after[aborts] - before == 20


BAD = [
    ("malformed JSON", "/v1/completions", b'{"prompt": ', 400, None),
    ("not an object", "/v1/completions", b"[1, 2]", 400, None),
    ("unknown model", "/v1/completions", {"model": "nope", "prompt": "a"}, 404, "model"),
    ("too long", "/v1/completions", {"prompt": [5] * 600}, 400, "prompt"),
    (
        "max_tokens past context",
        "/v1/completions",
        {"prompt": "a", "max_tokens": 9999},
        400,
        "max_tokens",
    ),
    ("temperature", "/v1/completions", {"prompt": "a", "temperature": -1}, 400, "temperature"),
    ("n", "/v1/completions", {"prompt": "a", "n": 0}, 400, "n"),
    ("logprobs", "/v1/completions", {"prompt": "a", "logprobs": 50}, 400, "logprobs"),
    ("token id", "/v1/completions", {"prompt": [10**9]}, 400, "prompt"),
    ("empty prompt", "/v1/completions", {"prompt": []}, 400, "prompt"),
    ("prompt type", "/v1/completions", {"prompt": 3}, 400, "prompt"),
    ("no messages", "/v1/chat/completions", {"messages": []}, 400, "messages"),
    (
        "role",
        "/v1/chat/completions",
        {"messages": [{"role": "x", "content": "a"}]},
        400,
        "messages",
    ),
    (
        "tools",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "a"}], "tools": [{"type": "function"}]},
        400,
        "tools",
    ),
    (
        "top_logprobs alone",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "a"}], "top_logprobs": 2},
        400,
        "top_logprobs",
    ),
]


@pytest.mark.parametrize("name,path,body,status,param", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_its_status_and_openai_error_shape(server, name, path, body, status, param):
    raw = body if isinstance(body, bytes) else None
    got, _, answer = server.request("POST", path, None if raw else body, raw=raw)
    assert got == status
    assert (
        set(answer["error"]) == {"message", "type", "param", "code"} and answer["error"]["message"]
    )
    if param is not None:
        assert answer["error"]["param"] == param
    assert server.request("GET", "/health")[0] == 200  # and it keeps serving


def test_unknown_route_answers_in_the_same_shape(server):
    status, _, answer = server.request("GET", "/v1/nothing")
    assert status == 404 and answer["error"]["type"] == "not_found_error"


@pytest.fixture(scope="module")
def guarded(model, tmp_path_factory):
    srv = start_server(
        model,
        tmp_path_factory.mktemp("guarded"),
        "--api-key",
        "sesame",
        "--max-num-seqs",
        "1",
        "--max-queued-requests",
        "1",
        "--max-request-size",
        "2KiB",
        "--shutdown-timeout",
        "30",
    )
    yield srv
    srv.stop()


KEY = {"Authorization": "Bearer sesame"}


def test_api_key_is_required_on_v1_routes(guarded):
    assert guarded.request("GET", "/v1/models")[0] == 401
    assert guarded.request("GET", "/v1/models", headers={"Authorization": "Bearer wrong"})[0] == 401
    status, _, answer = guarded.request("GET", "/v1/models", headers=KEY)
    assert status == 200 and answer["data"][0]["object"] == "model"
    assert guarded.request("GET", "/health")[0] == 200  # probes need no key


def test_body_size_is_limited(guarded):
    status, _, answer = guarded.request("POST", "/v1/completions", {"prompt": "a" * 4096}, KEY)
    assert status == 413 and answer["error"]["code"] == "too_large"


def test_a_full_queue_answers_429_with_retry_after(guarded):
    # max-num-seqs 1 and max-queued-requests 1: of six at once, one runs, one waits
    results = []
    body = {"prompt": "a", "max_tokens": 500, "ignore_eos": True}

    def send() -> None:
        results.append(guarded.request("POST", "/v1/completions", body, KEY))

    threads = [threading.Thread(target=send) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    refused = [r for r in results if r[0] == 429]
    assert len(refused) >= 3 and {r[0] for r in results} == {200, 429}
    assert all(r[1]["retry-after"] == "1" for r in refused)
    assert all(r[2]["error"]["code"] == "queue_full" for r in refused)
    assert guarded.request("POST", "/v1/completions", {"prompt": "b"}, KEY)[0] == 200


def test_sigterm_finishes_the_stream_in_flight_and_exits_0(model, tmp_path):
    srv = start_server(model, tmp_path, "--shutdown-timeout", "30")
    response = _open_stream(srv, 200)
    srv.process.send_signal(signal.SIGTERM)
    rest = response.read()
    assert b'"finish_reason":"length"' in rest and rest.rstrip().endswith(b"data: [DONE]")
    assert srv.process.wait(60) == 0
    assert "Shutting down" in srv.log.read_text()


def test_a_tp2_server_is_503_while_loading_and_stops_cleanly_on_a_group_sigterm(model, tmp_path):
    srv = start_server(model, tmp_path, "--tp", "2", wait=False)
    seen = wait_healthy(srv)
    answered = [s for s in seen if s is not None]
    # its worker processes import torch while the server already answers: seconds
    assert answered[-1] == 200 and set(answered[:-1]) == {503}
    body = {"prompt": "The king", "max_tokens": 6, "temperature": 0}
    status, _, answer = srv.request("POST", "/v1/completions", body)
    assert status == 200 and answer["usage"]["completion_tokens"] == 6
    os.killpg(srv.process.pid, signal.SIGTERM)  # as a terminal or systemd would: workers too
    assert srv.process.wait(60) == 0
    assert "Traceback" not in srv.log.read_text()


@pytest.mark.parametrize("kind", ["int8", "shard-tp2"])
def test_quantized_and_sharded_checkpoints_serve_what_the_engine_generates(
    model, tmp_path, cli, kind
):
    if kind == "int8":
        path, args, tp = (
            tmp_path / "int8",
            ["quantize", model, tmp_path / "int8", "--method", "int8"],
            1,
        )
    else:
        path, args, tp = tmp_path / "tp2", ["shard", model, tmp_path / "tp2", "--tp", "2"], 2
    assert cli(*args).code == 0
    llm = LLM(path, EngineConfig(tp=tp))
    try:
        expected = llm.generate(PROMPTS, SamplingParams(max_tokens=8, temperature=0))
    finally:
        llm.close()
    srv = start_server(path, tmp_path, "--tp", str(tp))
    try:
        for prompt, want in zip(PROMPTS, expected, strict=True):
            body = {"prompt": prompt, "max_tokens": 8, "temperature": 0}
            status, _, answer = srv.request("POST", "/v1/completions", body)
            assert status == 200 and answer["choices"][0]["text"] == want.outputs[0].text
    finally:
        assert srv.stop() == 0


def test_the_stats_line_counts_the_tokens_guides_forced(server, client, model):
    schema = {"type": "object", "properties": {"count": {"type": "integer"}},
              "required": ["count"], "additionalProperties": False}  # fmt: skip
    response_format = {"type": "json_schema", "json_schema": {"name": "n", "schema": schema}}
    client.completions.create(model=str(model), prompt=PROMPTS[1], max_tokens=20, temperature=0,
                              extra_body={"response_format": response_format})  # fmt: skip
    deadline = time.monotonic() + 5
    log = server.log.read_text()
    while "tokens guides forced" not in log and time.monotonic() < deadline:
        time.sleep(0.2)  # --stats-interval 1
        log = server.log.read_text()
    assert "tokens guides forced verified as drafts" in log


def test_each_request_and_the_stats_are_logged(server, client, model):
    client.completions.create(model=str(model), prompt=PROMPTS[3], max_tokens=3, temperature=0)
    deadline = time.monotonic() + 5
    log = server.log.read_text()
    while "generated tokens/s" not in log and time.monotonic() < deadline:
        time.sleep(0.2)  # --stats-interval 1: the busy second just ended is reported
        log = server.log.read_text()
    assert "prompt + 3 completion tokens, TTFT" in log and "finish length" in log
    assert "generated tokens/s" in log and "KV cache" in log
    assert "INFO llmkit.engine: KV cache: " in log  # from the engine process, at start-up


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _maps_torch(pid: int) -> bool:
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


def test_only_the_engine_process_loads_torch_and_the_server_stops_when_it_dies(model, tmp_path):
    srv = start_server(model, tmp_path)
    try:
        (engine,) = _children(srv.process.pid)
        assert _maps_torch(engine) and not _maps_torch(srv.process.pid)
        response = _open_stream(srv, 400)
        os.kill(engine, signal.SIGKILL)
        rest = response.read()  # ends instead of hanging, with the error as its last event
        assert b'"type":"server_error"' in rest and b"the engine process exited" in rest
        assert srv.process.wait(60) == 1
    finally:  # whatever is left of it, if a check failed
        with contextlib.suppress(ProcessLookupError):
            os.killpg(srv.process.pid, signal.SIGKILL)
    assert "error: the engine process exited with -9" in srv.log.read_text()


def _serve(*args: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "llmkit", "serve", *map(str, args)]
    return subprocess.Popen(command, stderr=subprocess.PIPE, text=True, start_new_session=True)


def test_a_model_that_fails_to_load_exits_1_with_one_line(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    proc = _serve(tmp_path, "--port", free_port())
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 1 and "Traceback" not in err
    assert f"error: loading {tmp_path} failed: no weights in {tmp_path}" in err


def test_bad_arguments_leave_no_engine_process_behind(model):
    proc = _serve(model, "--port", "eighty")
    assert proc.wait(60) == 2
    # the engine process, forked before the arguments were parsed, went with the server
    session = [p for p in os.listdir("/proc") if p.isdigit() and _session(int(p)) == proc.pid]
    assert session == []


def _session(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[3])  # after the name: state ppid pgrp session
