"""LoRA adapters made with peft in the test: a request with an adapter scores its prompt as
transformers + peft with that adapter merged does (float32), a batch mixing the base and two
adapters gives each request what it gets alone, and adapters load and unload at run time."""

from __future__ import annotations

import json

import pytest
import torch

from llmkit.errors import LlmkitError
from llmkit.runtime.engine import LLM, EngineConfig
from llmkit.runtime.model_runner import _lora_segments
from llmkit.runtime.sequence import SamplingParams, Sequence

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPT = [1, 40, 41, 300, 17, 99, 250, 7, 61, 3, 140, 200, 31, 77, 5, 88, 19, 400]


def _make_adapter(base_dir, out_dir, seed: int, **config) -> torch.nn.Module:
    """A random (non-zero) PEFT LoRA on the base, saved; returns the base with it merged."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    lora = peft.LoraConfig(init_lora_weights=False, **config)
    wrapped = peft.get_peft_model(model, lora)
    for name, p in wrapped.named_parameters():
        if "lora_" in name:  # larger than peft's init, so the adapter moves the logits
            p.data.normal_(0, 0.2)
    wrapped.save_pretrained(out_dir)
    return wrapped.merge_and_unload().eval()


@pytest.fixture(scope="module")
def adapters(tiny_dir, tmp_path_factory):
    base = tiny_dir()
    tmp = tmp_path_factory.mktemp("loras")
    a = _make_adapter(base, tmp / "a", 1, r=4, lora_alpha=8, target_modules=ALL)
    b = _make_adapter(base, tmp / "b", 2, r=8, lora_alpha=4, use_rslora=True,
                      target_modules=["q_proj", "v_proj", "down_proj"])  # fmt: skip
    return {"a": (tmp / "a", a), "b": (tmp / "b", b)}


@pytest.fixture(scope="module")
def llm(tiny_dir, adapters):
    engine = LLM(tiny_dir(), EngineConfig(max_loras=3, dtype="float32"))
    for name, (path, _) in adapters.items():
        engine.engine.add_lora(name, str(path))
    yield engine
    engine.close()


def _reference_logprobs(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits, -1)  # [positions, vocab]


@pytest.mark.parametrize("name", ["a", "b"])
def test_an_adapter_scores_as_peft_merged(llm, adapters, name):
    out = llm.generate([PROMPT], SamplingParams(max_tokens=1, prompt_logprobs=5), loras=name)[0]
    ref = _reference_logprobs(adapters[name][1], PROMPT)
    base = _reference_logprobs(
        transformers.AutoModelForCausalLM.from_pretrained(llm.engine.model_path), PROMPT
    )
    moved = 0.0
    for pos, entry in enumerate(out.prompt_logprobs[1:], start=0):
        expected = ref[pos, PROMPT[pos + 1]].item()
        assert entry["logprob"] == pytest.approx(expected, abs=2e-4)
        for token, lp in entry["top"]:
            assert lp == pytest.approx(ref[pos, token].item(), abs=2e-4)
        moved = max(moved, abs(expected - base[pos, PROMPT[pos + 1]].item()))
    assert moved > 0.05  # the adapter changes the scores: the test can tell


def test_a_mixed_batch_gives_each_request_what_it_gets_alone(llm):
    prompts = [PROMPT[:9], PROMPT[3:], PROMPT[:12], PROMPT[5:14], PROMPT[2:16]]
    loras = [None, "a", "b", "a", None]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=2)
    pairs = zip(prompts, loras, strict=True)
    alone = [llm.generate([p], params, loras=lo)[0].outputs[0] for p, lo in pairs]
    mixed = [o.outputs[0] for o in llm.generate(prompts, params, loras=loras)]
    for one, both in zip(alone, mixed, strict=True):
        assert both.token_ids == one.token_ids
        for x, y in zip(both.logprobs, one.logprobs, strict=True):
            assert x["logprob"] == pytest.approx(y["logprob"], abs=1e-5)
    assert len({tuple(o.token_ids) for o in mixed[:3]}) == 3  # adapters change the answer


def test_the_prefix_cache_is_keyed_by_adapter(llm):
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, logprobs=0)
    long = [t + 1 for t in PROMPT] * 3  # no request before had it
    base_first = llm.generate([long], params)[0].outputs[0]
    with_a = llm.generate([long], params, loras="a")[0]
    assert with_a.num_cached_tokens == 0  # the base's blocks are not the adapter's
    again = llm.generate([long], params, loras="a")[0]
    assert again.num_cached_tokens > 0
    assert again.outputs[0].token_ids == with_a.outputs[0].token_ids != base_first.token_ids


@pytest.mark.parametrize("speculative", ["ngram", "draft"])
def test_speculation_verifies_with_each_requests_adapter(tiny_dir, llm, adapters, speculative):
    """Drafts (prompt lookup, or the base model as the draft model) verified by the base
    with each request's adapter: the greedy tokens of decoding without speculation."""
    prompts = [PROMPT + PROMPT[:6], PROMPT[3:] + PROMPT[3:9], PROMPT[:12] * 2]
    loras = ["a", None, "b"]
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    plain = [o.outputs[0].token_ids for o in llm.generate(prompts, params, loras=loras)]
    spec = "ngram" if speculative == "ngram" else str(tiny_dir())
    config = EngineConfig(max_loras=3, dtype="float32", speculative=spec,
                          speculative_max_seqs=8, draft_min_confidence=0.0)  # fmt: skip
    speculating = LLM(tiny_dir(), config)
    try:
        for name, (path, _) in adapters.items():
            speculating.engine.add_lora(name, str(path))
        outs = speculating.generate(prompts, params, loras=loras)
        assert [o.outputs[0].token_ids for o in outs] == plain
        assert speculating.engine.spec_stats.accepted > 0
    finally:
        speculating.close()


def test_load_unload_while_requests_run(llm, adapters):
    engine = llm.engine
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    alone = llm.generate([PROMPT], params, loras="b")[0].outputs[0].token_ids
    engine.add_request("busy", None, PROMPT, params, lora="b")
    engine.step()
    engine.remove_lora("b")  # in use: it stays until the request ends
    with pytest.raises(LlmkitError, match="no LoRA adapter named 'b'"):
        engine.add_request("late", None, PROMPT, params, lora="b")
    engine.add_lora("c", str(adapters["a"][0]))  # a third slot is free
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            done[out.request_id] = out
    assert done["busy"].outputs[0].token_ids == alone
    assert not engine.loras.retiring  # gone once unused
    engine.add_lora("b", str(adapters["b"][0]))  # loads again, under a new id
    assert llm.generate([PROMPT], params, loras="b")[0].outputs[0].token_ids == alone
    engine.remove_lora("c")


def test_adapters_that_do_not_fit_are_refused_with_one_line(llm, adapters, tmp_path):
    engine = llm.engine
    with pytest.raises(LlmkitError, match=r"no adapter_config\.json"):
        engine.add_lora("x", str(tmp_path))
    with pytest.raises(LlmkitError, match="loaded already"):
        engine.add_lora("a", str(adapters["a"][0]))
    bad = tmp_path / "wide"
    bad.mkdir()
    config = json.loads((adapters["a"][0] / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(LlmkitError, match="use_dora"):
        engine.add_lora("x", str(bad))
    (bad / "adapter_config.json").write_text(json.dumps(config))
    from safetensors.torch import load_file, save_file

    tensors = load_file(adapters["a"][0] / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("q_proj.lora_B.weight"))
    tensors[key] = torch.zeros(tensors[key].shape[0] + 1, tensors[key].shape[1])
    save_file(tensors, bad / "adapter_model.safetensors")
    with pytest.raises(LlmkitError, match=r"q_proj is \[65, 64\], the base model's is \[64, 64\]"):
        engine.add_lora("x", str(bad))
    assert "x" not in engine.loras.ids
    with pytest.raises(LlmkitError, match="--max-lora-rank"):
        engine.executor.add_lora(99, str(adapters["b"][0]), 4)


def test_segments_cover_each_adapters_runs():
    seqs = [Sequence([1], lora_id=i) for i in (0, 2, 2, 0, 1)]
    assert _lora_segments(seqs, [1, 1, 3, 2, 4]) == [(2, 1, 5), (1, 7, 11)]


@pytest.fixture(scope="module")
def server(tiny_dir, adapters, tmp_path_factory):
    from tests.serve_helpers import start_server

    lora_dir = adapters["a"][0].parent
    srv = start_server(tiny_dir(), tmp_path_factory.mktemp("lora-serve"),
                       "--lora", f"a={adapters['a'][0]}", "--lora-dir", str(lora_dir))  # fmt: skip
    yield srv
    assert srv.stop() == 0


def _complete(server, model: str, max_tokens: int = 8):
    body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True}  # fmt: skip
    return server.request("POST", "/v1/completions", body)


def test_the_server_serves_adapters_by_model_name(server, llm):
    status, _, models = server.request("GET", "/v1/models")
    assert [(m["id"], m.get("parent")) for m in models["data"]] == [("ckpt", None), ("a", "ckpt")]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    for model, lora in [("ckpt", None), ("a", "a")]:
        status, _, answer = _complete(server, model)
        assert status == 200, answer
        expected = llm.generate([PROMPT], params, loras=lora)[0].outputs[0].text
        assert answer["choices"][0]["text"] == expected
    status, _, answer = _complete(server, "nope")
    assert status == 404 and answer["error"]["code"] == "model_not_found"


def test_adapters_load_and_unload_under_load(server, adapters, tmp_path):
    import threading

    results = {}

    def long_request():
        results["a"] = _complete(server, "a", max_tokens=200)

    worker = threading.Thread(target=long_request)
    worker.start()
    body = {"lora_name": "b", "lora_path": str(adapters["b"][0])}
    status, _, answer = server.request("POST", "/v1/load_lora_adapter", body)
    assert status == 200, answer
    assert _complete(server, "b")[0] == 200
    status, _, _ = server.request("POST", "/v1/unload_lora_adapter", {"lora_name": "a"})
    assert status == 200
    assert _complete(server, "a")[0] == 404  # at once, while its last request still runs
    worker.join(120)
    status, _, answer = results["a"]
    assert status == 200 and answer["usage"]["completion_tokens"] == 200
    outside = {"lora_name": "c", "lora_path": str(tmp_path)}
    status, _, answer = server.request("POST", "/v1/load_lora_adapter", outside)
    assert status == 403 and answer["error"]["param"] == "lora_path"
    for body, code in [({"lora_name": "b", "lora_path": str(adapters["b"][0])}, 400),
                       ({"lora_name": "ckpt", "lora_path": str(adapters["b"][0])}, 400),
                       ({"lora_name": "x y", "lora_path": str(adapters["b"][0])}, 400),
                       ({"lora_name": "c", "lora_path": str(adapters["b"][0].parent)}, 400),
                       ({"lora_name": 5, "lora_path": "x"}, 400)]:  # fmt: skip
        status, _, answer = server.request("POST", "/v1/load_lora_adapter", body)
        assert status == code, (body, answer)
    status, _, _ = server.request("POST", "/v1/unload_lora_adapter", {"lora_name": "a"})
    assert status == 404
    status, _, _ = server.request("POST", "/v1/load_lora_adapter", {"lora_name": "a",
                                  "lora_path": str(adapters["a"][0])})  # fmt: skip
    assert status == 200 and _complete(server, "a")[0] == 200


@pytest.mark.parametrize("method", [["int8"], ["rtn", "--group-size", "32"]])
def test_an_adapter_on_a_quantized_base_scores_as_peft_on_its_dequantized_weights(
    cli, tiny_dir, adapters, tmp_path, method
):
    """A prompt longer than KERNEL_MAX_ROWS (a prefill) on a quantized base: its Linears run
    through llmkit's kernels, which see their inputs in int8 blocks of 32, so the reference's
    quantized base layers see theirs so too (the adapter's product takes the inputs as they
    are, in both). The two computations' float32 activations differ by ~1e-7, which now and
    then rounds one activation to the next int8 step on one side only: the logprobs from that
    position on move by up to ~1e-2, where the adapter moves them by up to ~0.4."""
    from llmkit.checkpoint.reader import open_checkpoint
    from llmkit.quant.formats.loader import dequantized_state
    from llmkit.runtime.layers.linear import KERNEL_MAX_ROWS
    from tests.test_cpu_gemm import blocks_of_32

    quantized = tmp_path / "q"
    assert cli("quantize", tiny_dir(), quantized, "--method", *method).code == 0
    reference = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir(), dtype=torch.float32)
    with open_checkpoint(quantized) as ck:
        state, _ = dequantized_state(ck)
    reference.load_state_dict({k: v.float() for k, v in state.items()})
    prompt = (PROMPT * 5)[: KERNEL_MAX_ROWS + 16]
    base = _reference_logprobs(reference, prompt)
    peft_model = peft.PeftModel.from_pretrained(reference, adapters["a"][0])
    for name, module in peft_model.named_modules():
        if name.endswith(tuple(f"{proj}.base_layer" for proj in ALL)):
            module.register_forward_pre_hook(_in_int8_blocks_of_32(blocks_of_32))
    ref = _reference_logprobs(peft_model.eval(), prompt)
    llm = LLM(quantized, EngineConfig(max_loras=1, dtype="float32"))
    try:
        llm.engine.add_lora("a", str(adapters["a"][0]))
        params = SamplingParams(max_tokens=1, prompt_logprobs=0)
        out = llm.generate([prompt], params, loras="a")[0].prompt_logprobs[1:]
    finally:
        llm.close()
    for pos, (entry, token) in enumerate(zip(out, prompt[1:], strict=True)):
        assert entry["logprob"] == pytest.approx(ref[pos, token].item(), abs=2e-2)
    assert max(abs(ref[i, t] - base[i, t]).item() for i, t in enumerate(prompt[1:])) > 0.2


def _in_int8_blocks_of_32(blocks_of_32):
    """A forward pre-hook giving a Linear its input [..., in] as int8 blocks of 32 hold it."""

    def hook(module, args):
        x = args[0]
        rows = blocks_of_32(x.reshape(-1, x.shape[-1]))
        return (rows.to(x.dtype).reshape(x.shape), *args[1:])

    return hook


def test_bench_offline_runs_every_request_with_the_adapter(cli, tiny_dir, tmp_path, monkeypatch):
    from llmkit.runtime.engine import Engine

    asked = []
    add_request = Engine.add_request

    def recording(self, *args, lora=None, **kwargs):
        asked.append(lora)
        return add_request(self, *args, lora=lora, **kwargs)

    monkeypatch.setattr(Engine, "add_request", recording)
    out = tmp_path / "offline.json"
    args = ["bench", "offline", tiny_dir(), "--batch-sizes", "2", "--input-len", "8",
            "--output-len", "4", "-o", out]  # fmt: skip
    wide = tmp_path / "rank32"  # over the default --max-lora-rank: the bench makes room
    _make_adapter(tiny_dir(), wide, 3, r=32, lora_alpha=16, target_modules=["o_proj"])
    assert cli(*args, "--lora", wide).code == 0
    assert json.loads(out.read_text())["lora"] == str(wide)
    assert asked and set(asked) == {"adapter"}
    refused = cli(*args, "--lora", tiny_dir())
    assert refused.code == 1 and "no adapter_config.json" in refused.err
    assert len(refused.err.strip().splitlines()) == 1


def test_a_recipe_benchmarks_an_adapter_offline_and_served(cli, tmp_path, adapters):
    out = tmp_path / "out"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"name: lora\nsource:\n  init: tiny-llama\noutputs: {out}\nsteps:\n"
        f"  - id: offline\n    bench:\n      offline:\n        batch_sizes: [2]\n"
        f"        input_len: [8]\n        output_len: [4]\n        lora: {adapters['a'][0]}\n"
        f"  - id: served\n    bench:\n      serve:\n        model: source\n"
        f"        num_prompts: 4\n        input_len: 8\n        output_len: 4\n"
        f"        lora: {adapters['a'][0]}\n      assert: ['failed<=0']\n"
    )
    done = cli("run", recipe, "--json")
    assert done.code == 0, done.err
    assert json.loads((out / "offline.json").read_text())["lora"] == str(adapters["a"][0])
    served = json.loads((out / "served.json").read_text())
    assert served["model_id"] == "adapter" and served["completed"] == 4  # the adapter answered


def test_an_adapter_unloaded_before_its_request_reaches_the_engine_is_a_404(llm):
    """The front end checked the name, then the adapter went: the engine refuses the add with
    UnknownAdapter (it crosses the pipe as it is), which the server answers as a 404."""
    import pickle

    from llmkit.serve.engine_process import EngineStats, Step, _Loop
    from llmkit.serve.handlers import _server_error

    step = Step([], EngineStats())
    params = SamplingParams(max_tokens=2)
    _Loop(llm.engine, None)._command(("add", "late", PROMPT, params, 0.0, "gone"), step)
    ((request_id, error),) = pickle.loads(pickle.dumps(step)).rejected
    answer = _server_error(error)
    assert request_id == "late" and answer.status == 404
    assert answer.body()["error"]["code"] == "model_not_found"
    assert not llm.engine.has_unfinished()
