"""llmkit's C++ CPU decode-attention kernel against a float64 computation over the same paged
cache, the attention layer with and without it, and the element-wise kernels against the
torch ops they replace."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llmkit.kernels import cpu
from llmkit.runtime.layers import attention
from llmkit.runtime.layers.attention import AttentionMetadata, paged_attention
from tests.conftest import run_python

pytestmark = pytest.mark.skipif(
    cpu.ops() is None, reason="llmkit's CPU kernels could not be built here (no C++ compiler?)"
)


def paged_case(seed, dtype, heads, kv_heads, head_dim, block_size, lens):
    """A cache with random contents, each sequence's blocks scattered at random."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.tensor(lens)
    max_blocks = int(-(-lens.max() // block_size))
    num_blocks = len(lens) * max_blocks + 3
    shape = (num_blocks, kv_heads, block_size, head_dim)
    k_cache = torch.randn(shape, generator=g).to(dtype)
    v_cache = torch.randn(shape, generator=g).to(dtype)
    order = torch.randperm(num_blocks, generator=g)
    tables = order[: len(lens) * max_blocks].view(len(lens), max_blocks).contiguous()
    q = torch.randn(len(lens), heads, head_dim, generator=g).to(dtype)
    return q, k_cache, v_cache, tables, lens


def reference(q, k_cache, v_cache, tables, lens, scale):
    """Softmax attention in float64, one sequence and head at a time."""
    heads, kv_heads = q.shape[1], k_cache.shape[1]
    block_size = k_cache.shape[2]
    out = torch.empty(q.shape, dtype=torch.float64)
    for s, n in enumerate(lens.tolist()):
        t = torch.arange(n)
        blocks, offsets = tables[s, t // block_size], t % block_size
        for h in range(heads):
            kv = h // (heads // kv_heads)
            keys = k_cache[blocks, kv, offsets].double()
            values = v_cache[blocks, kv, offsets].double()
            probs = (keys @ q[s, h].double() * scale).softmax(0)
            out[s, h] = probs @ values
    return out


# groups of 1 to 5 query heads per KV head (the vector paths take several at a time, then
# the rest one by one), head dims the wide paths specialise (64, 128) and others, with 8
# values after the last 16 (8, 24)
@pytest.mark.parametrize(
    "heads, kv_heads, head_dim",
    [(4, 4, 16), (12, 4, 64), (8, 2, 32), (4, 1, 128), (10, 2, 64), (10, 2, 128), (8, 4, 8),
     (6, 2, 24)],
)  # fmt: skip
@pytest.mark.parametrize("block_size", [16, 32])  # the wide paths take 16 keys at a time
@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.bfloat16, 1.6e-2)])
def test_decode_kernel_matches_float64(heads, kv_heads, head_dim, block_size, dtype, atol):
    lens = [1, 15, 16, 17, 33, 100, 257]  # around block edges, and a lone token
    q, k_cache, v_cache, tables, lens = paged_case(
        0, dtype, heads, kv_heads, head_dim, block_size, lens
    )
    scale = head_dim**-0.5
    out = torch.empty_like(q)
    cpu.ops().paged_decode(out, q, k_cache, v_cache, tables, lens, scale)
    expected = reference(q, k_cache, v_cache, tables, lens, scale)
    assert torch.allclose(out.double(), expected, atol=atol, rtol=0)


def draft_rows(tables, lens, drafts):
    """Rows as a verifying step has them: sequence s's query, then one per draft token of
    drafts[s], each with the sequence's block table and one key more than the row before."""
    rows = [s for s, n in enumerate(drafts) for _ in range(n + 1)]
    extra = [j for n in drafts for j in range(n + 1)]
    return tables[rows].contiguous(), lens[rows] + torch.tensor(extra), rows


@pytest.mark.parametrize(
    "heads, kv_heads, head_dim", [(12, 4, 64), (4, 1, 128), (6, 2, 24), (10, 2, 64)]
)
@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.bfloat16, 1.6e-2)])
def test_draft_rows_share_a_pass_and_match_float64(heads, kv_heads, head_dim, dtype, atol):
    """A sequence's draft rows, read together in one pass over its cache, give each row's
    own attention: the float64 reference's, and the bits of each row computed alone. Drafts
    of 0 to 17 tokens (past the 16 rows a pass takes), lengths across block edges."""
    lens = torch.tensor([14, 1, 40, 100, 31])
    drafts = [2, 0, 4, 17, 1]
    _, k_cache, v_cache, tables, _ = paged_case(
        7, dtype, heads, kv_heads, head_dim, 16, (lens + torch.tensor(drafts)).tolist()
    )
    tables, row_lens, rows = draft_rows(tables, lens, drafts)
    g = torch.Generator().manual_seed(8)
    q = torch.randn(len(rows), heads, head_dim, generator=g).to(dtype)
    scale = head_dim**-0.5
    out = torch.empty_like(q)
    cpu.ops().paged_decode(out, q, k_cache, v_cache, tables, row_lens, scale)
    expected = reference(q, k_cache, v_cache, tables, row_lens, scale)
    assert torch.allclose(out.double(), expected, atol=atol, rtol=0)
    for r in range(len(rows)):
        alone = torch.empty_like(q[r : r + 1])
        cpu.ops().paged_decode(alone, q[r : r + 1], k_cache, v_cache, tables[r : r + 1],
                               row_lens[r : r + 1], scale)  # fmt: skip
        assert torch.equal(out[r], alone[0]), r


def test_rows_of_other_blocks_or_fewer_keys_do_not_share_a_pass():
    """A row after another whose blocks differ in one the earlier row reads, or which sees
    fewer keys, is attended over its own blocks and length."""
    _, k_cache, v_cache, tables, _ = paged_case(9, torch.float32, 4, 2, 16, 8, [30, 30, 30])
    tables = tables[[0, 0, 0, 0]].clone()
    tables[1, 2] = tables[2, 0]  # row 1 differs from row 0 in block 2, which row 0 reads
    tables[3, 3] = tables[2, 1]  # row 3 differs in block 3, past row 2's 20 keys: joins it
    row_lens = torch.tensor([21, 22, 20, 27])  # row 2: fewer keys than row 1
    q = torch.randn(4, 4, 16, generator=torch.Generator().manual_seed(10))
    out = torch.empty_like(q)
    cpu.ops().paged_decode(out, q, k_cache, v_cache, tables, row_lens, 0.25)
    expected = reference(q, k_cache, v_cache, tables, row_lens, 0.25)
    assert torch.allclose(out.double(), expected, atol=1e-5, rtol=0)


def test_large_scores_do_not_overflow():
    q, k_cache, v_cache, tables, lens = paged_case(1, torch.float32, 4, 2, 16, 8, [40, 9])
    q *= 300  # scores in the thousands: exp must be taken after the max is subtracted
    out = torch.empty_like(q)
    cpu.ops().paged_decode(out, q, k_cache, v_cache, tables, lens, 0.25)
    expected = reference(q, k_cache, v_cache, tables, lens, 0.25)
    assert torch.isfinite(out).all()
    assert torch.allclose(out.double(), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.bfloat16, 1.6e-2)])
def test_attention_layer_same_with_and_without_the_kernel(monkeypatch, dtype, atol):
    """Decodes (kernel) and a prefill (torch) in one batch, against the torch-only path."""
    heads, kv_heads, head_dim, block_size = 6, 2, 32, 16
    q, k_cache, v_cache, tables, lens = paged_case(2, dtype, heads, kv_heads, head_dim, 16, [5, 70])
    # the two decodes' new tokens go to their last slots; a 3-token prefill of a new sequence
    # goes to a free block
    free = int(k_cache.shape[0]) - 1
    last = [int(tables[s, (n - 1) // block_size]) * block_size + (n - 1) % block_size
            for s, n in enumerate(lens.tolist())]  # fmt: skip
    slots = torch.tensor([*last, free * block_size, free * block_size + 1, free * block_size + 2])
    g = torch.Generator().manual_seed(3)
    q = torch.cat([q, torch.randn(3, heads, head_dim, generator=g).to(dtype)])
    k = torch.randn(5, kv_heads, head_dim, generator=g).to(dtype)
    v = torch.randn(5, kv_heads, head_dim, generator=g).to(dtype)

    def run() -> torch.Tensor:
        meta = AttentionMetadata(slots, 2, tables, lens)
        meta.prefills = [attention.Prefill(2, 3, 0, [0])]
        return paged_attention(q, k, v, k_cache.clone(), v_cache.clone(), meta, head_dim**-0.5)

    with_kernel = run()
    monkeypatch.setattr(cpu, "ops", lambda: None)
    without = run()
    assert torch.allclose(with_kernel.float(), without.float(), atol=atol, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_puts_each_token_in_its_slot(dtype):
    g = torch.Generator().manual_seed(4)
    num_blocks, kv_heads, block_size, head_dim, tokens = 9, 2, 4, 16, 11
    qkv = torch.randn(tokens, (4 + 2 * kv_heads) * head_dim, generator=g).to(dtype)
    _, k, v = qkv.split([4 * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    k, v = k.reshape(tokens, kv_heads, head_dim), v.reshape(tokens, kv_heads, head_dim)
    assert not k.is_contiguous()  # as the layer hands them over: views of one projection
    slots = torch.randperm(num_blocks * block_size, generator=g)[:tokens]
    k_cache = torch.randn(num_blocks, kv_heads, block_size, head_dim, generator=g).to(dtype)
    v_cache = torch.randn(k_cache.shape, generator=g).to(dtype)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    blocks, offsets = slots // block_size, slots % block_size
    for i in range(tokens):
        expected_k[blocks[i], :, offsets[i]] = k[i]
        expected_v[blocks[i], :, offsets[i]] = v[i]
    cpu.ops().write_kv(k_cache, v_cache, k, v, slots)
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-6), (torch.bfloat16, 0)])
@pytest.mark.parametrize("dim", [96, 100])  # whole vectors; a scalar tail after them
def test_add_rms_norm_rounds_as_the_reference(dtype, atol, dim):
    """residual + x rounded to the dtype, normalised in float32, rounded, times the weight:
    the llama reference's order. Compared to the float64 norm of the rounded sum, within
    one rounding of each cast."""
    g = torch.Generator().manual_seed(5)
    residual = (3 * torch.randn(37, dim, generator=g)).to(dtype)
    x = torch.randn(37, dim, generator=g).to(dtype)
    weight = (1 + 0.1 * torch.randn(dim, generator=g)).to(dtype)
    total = residual + x
    normed = total.double() * (total.double().pow(2).mean(-1, keepdim=True) + 1e-6).rsqrt()
    expected = weight.double() * normed.to(dtype).double()
    out = cpu.ops().add_rms_norm(residual, x, weight, 1e-6)
    assert torch.equal(residual, total)  # updated in place
    ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-22
    assert torch.allclose(out.double(), expected, rtol=2 * ulp, atol=atol)


def test_the_engine_gives_the_same_tokens_with_the_torch_paths(tiny_dir):
    """LLMKIT_CPU_KERNELS=0 turns the kernels off; greedy float32 tokens stay the same."""
    code = f"""
import json
from llmkit.runtime.engine import LLM
from llmkit.kernels import cpu
from llmkit.runtime.sequence import SamplingParams
llm = LLM({str(tiny_dir("tiny-llama"))!r})
params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
outs = llm.generate([[1, 5, 9, 30], list(range(3, 60))], params)
print(json.dumps([cpu.ops() is None, [o.outputs[0].token_ids for o in outs]]))
llm.close()
"""
    runs = [run_python(code, env={"LLMKIT_CPU_KERNELS": flag}) for flag in ("0", "1")]
    for run in runs:
        assert run.returncode == 0, run.stderr
    (off, tokens_off), (on_missing, tokens_on) = (
        json.loads(r.stdout.splitlines()[-1]) for r in runs
    )
    assert off and not on_missing
    assert tokens_off == tokens_on


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim", [32, 40])  # halves of whole vectors, and not
def test_rotary_kernel_rounds_as_the_torch_ops(dtype, dim):
    from llmkit.runtime.layers.rotary import Rotary, _rotate_half

    g = torch.Generator().manual_seed(6)
    qkv = torch.randn(9, (6 + 2 * 2) * dim, generator=g).to(dtype)
    q, k, _ = qkv.split([6 * dim, 2 * dim, 2 * dim], dim=-1)
    q, k = q.reshape(9, 6, dim), k.reshape(9, 2, dim)  # strided views, as the layer has them
    positions = torch.tensor([0, 3, 7, 8, 20, 21, 22, 40, 63])
    cos, sin = Rotary(dim, 64, 10000.0, None)(positions, dtype)
    q_out, k_out = cpu.ops().rotary(q, k, cos.reshape(9, dim), sin.reshape(9, dim))
    assert torch.equal(q_out, q * cos + _rotate_half(q) * sin)
    assert torch.equal(k_out, k * cos + _rotate_half(k) * sin)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "heads, kv_heads, head_dim", [(6, 2, 32), (4, 4, 16), (8, 1, 64), (8, 4, 8), (4, 2, 24)]
)
def test_decode_attention_is_rotary_write_and_decode_in_one(dtype, heads, kv_heads, head_dim):
    """The fused op the C++ decode layer calls gives the bits of the three ops it replaces,
    cache contents included, for tokens of sequences of different lengths."""
    from llmkit.runtime.layers.rotary import Rotary

    lens = [1, 16, 17, 40]  # with the new token; it goes to the last position's slot
    _, k_cache, v_cache, tables, lens_t = paged_case(8, dtype, heads, kv_heads, head_dim, 16, lens)
    g = torch.Generator().manual_seed(9)
    tokens = len(lens)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=g).to(dtype)
    positions = lens_t - 1
    slots = tables[torch.arange(tokens), positions // 16] * 16 + positions % 16
    rotary = Rotary(head_dim, 64, 1e4, None)(positions, dtype)
    cos, sin = (c.reshape(tokens, head_dim) for c in rotary)
    scale = head_dim**-0.5

    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k = q.reshape(tokens, heads, head_dim), k.reshape(tokens, kv_heads, head_dim)
    caches = k_cache.clone(), v_cache.clone()
    q_rot, k_rot = cpu.ops().rotary(q, k, cos, sin)
    cpu.ops().write_kv(*caches, k_rot, v.reshape(tokens, kv_heads, head_dim), slots)
    expected = torch.empty_like(q_rot)
    cpu.ops().paged_decode(expected, q_rot, *caches, tables, lens_t, scale)

    out = cpu.ops().decode_attention(
        qkv, cos, sin, k_cache, v_cache, slots, tables, lens_t, heads, scale
    )
    assert torch.equal(out, expected.reshape(tokens, -1))
    assert torch.equal(k_cache, caches[0]) and torch.equal(v_cache, caches[1])


def test_decode_attention_refuses_a_qkv_of_the_wrong_width():
    _, k_cache, v_cache, tables, lens = paged_case(10, torch.float32, 4, 2, 16, 16, [3])
    qkv = torch.zeros(1, (4 + 2 * 2) * 16 + 1)
    cos = sin = torch.zeros(1, 16)
    slots = torch.tensor([2])
    with pytest.raises(RuntimeError, match="qkv must be contiguous"):
        cpu.ops().decode_attention(qkv, cos, sin, k_cache, v_cache, slots, tables, lens, 4, 0.25)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width", [80, 83])  # whole vectors; a scalar tail after them
def test_silu_mul_kernel_matches_the_torch_ops(dtype, width):
    g = torch.Generator().manual_seed(7)
    gate_up = 4 * torch.randn(13, 2 * width, generator=g)
    # exp's range ends, where e^-gate overflows or underflows, and the non-finite values
    extremes = [-120.0, -100.0, -89.0, -88.5, -87.0, -30.0, 30.0, 88.0, 90.0, 110.0]
    extremes += [float("inf"), float("-inf"), float("nan")]
    gate_up[0, : len(extremes)] = torch.tensor(extremes)
    gate_up = gate_up.to(dtype)
    gate, up = gate_up.chunk(2, dim=-1)
    expected = torch.nn.functional.silu(gate) * up
    out = cpu.ops().silu_mul(gate_up)
    ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-22  # exp may differ in its last bit
    assert torch.allclose(out.double(), expected.double(), rtol=2 * ulp, atol=1e-30, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_argmax_rows_is_torch_argmax(dtype):
    """Rows of 1, 7, 37 and 32000 entries (vector loops and their tails); ties (the first
    wins, one in the tail too), a NaN (the first NaN wins), all -inf, all NaN; bf16 rows as
    their float32 copies; rows that are a view's (cut short of the row stride)."""
    ops = cpu.ops()
    g = torch.Generator().manual_seed(3)
    for n in (1, 7, 37, 32000):
        x = torch.randn(12, n, generator=g)
        x[1] = 0.5  # all equal
        x[2, n // 3 :] = float(x[2].max()) + 1  # a tie from a third of the way on
        x[3, -1] = float("nan")
        x[4, n // 2 :] = float("nan")
        x[5] = float("-inf")
        x[6] = float("nan")
        x[7, -1] = float("inf")
        x[8, : n // 2] = float("inf")
        x[9, -min(n, 3) :] = float(x[9].max()) + 1  # a tie within the tail
        x = x.to(dtype)
        assert torch.equal(ops.argmax_rows(x), x.float().argmax(1)), n
        cut = x[:, : max(1, n - 5)]
        assert torch.equal(ops.argmax_rows(cut), cut.float().argmax(1)), n
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        ops.argmax_rows(torch.zeros(2, 5, dtype=torch.float16))


@pytest.mark.parametrize(
    "settings",
    [
        dict(group_size=16),
        dict(bits=3, group_size=-1, sym=False),
        dict(group_size=32, desc_act=True),
        dict(group_size=16, desc_act=True, static_groups=True),
        dict(bits=8, group_size=128, clip_search=False, act_group_aware=False),
    ],
)
def test_gptq_sweep_kernel_gives_the_torch_sweeps_values(monkeypatch, settings):
    """The C++ column sweep rounds every step as the torch ops do: same codes, same errors."""
    from llmkit.quant import gptq

    g = torch.Generator().manual_seed(3)
    x = torch.randn(1000, 384, generator=g) @ (torch.randn(384, 384, generator=g) * 0.2)
    h = gptq.Hessian(384, torch.device("cpu"))
    h.add(x)
    w = torch.randn(96, 384, generator=g) * 0.05
    config = gptq.GPTQSettings(**settings)
    fast = gptq.quantize(w, h.matrix, config)
    monkeypatch.setattr(cpu, "for_tensors", lambda *tensors: None)
    plain = gptq.quantize(w, h.matrix, config)
    for field in ("q", "scales", "zeros", "g_idx", "row_error"):
        assert torch.equal(getattr(fast, field), getattr(plain, field)), field


def test_cached_kernels_are_keyed_by_what_the_build_depends_on(monkeypatch, tmp_path):
    """A cached library is reused only for the same sources (the shared header too), flags,
    torch, Python and CPU: one built with -march=native elsewhere must not load on a CPU that
    lacks its features."""
    key = cpu._build_key()
    # the library ops() loaded (maybe building it in this process) is where the key says
    assert (cpu._extensions_root() / f"llmkit_cpu_{key}" / "ready").exists()
    monkeypatch.setattr(cpu, "_cpu_features", lambda: "x86_64 avx2 without avx512")
    assert cpu._build_key() != key
    monkeypatch.undo()
    monkeypatch.setattr(cpu, "CFLAGS", (*cpu.CFLAGS, "-DOTHER"))
    assert cpu._build_key() != key
    monkeypatch.undo()
    monkeypatch.setenv("LLMKIT_CPU_ARCH", "haswell")
    assert cpu._build_key() != key and cpu.cflags()[-1] == "-march=haswell"
    monkeypatch.undo()
    header = tmp_path / "cpu_vec.h"
    header.write_text(cpu.HEADERS[0].read_text() + "// changed\n")
    monkeypatch.setattr(cpu, "HEADERS", (header,))
    assert cpu._build_key() != key


@pytest.mark.parametrize("arch", ["", "haswell -fplugin=x.so", "../x", "native;rm"])
def test_cpu_arch_takes_only_a_target_name(monkeypatch, arch):
    """LLMKIT_CPU_ARCH goes onto the compiler's command line: only a -march target name."""
    monkeypatch.setenv("LLMKIT_CPU_ARCH", arch)
    with pytest.raises(ValueError, match="LLMKIT_CPU_ARCH"):
        cpu.cflags()


def test_a_built_library_loads_without_the_extension_loader():
    """Once built and marked ready, a new process loads the kernels straight from the cache,
    without importing torch's extension loader (and its setuptools)."""
    code = (
        "import sys, torch\n"
        "from llmkit.kernels import cpu\n"
        "assert cpu.ops() is not None\n"
        "print('torch.utils.cpp_extension' in sys.modules)\n"
    )
    done = run_python(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False"]


def test_a_build_killed_part_way_does_not_stall_the_next(monkeypatch, tmp_path):
    """torch's extension loader waits forever on the lock file a killed build leaves behind;
    the next build removes it (builds hold a lock the system frees when they end)."""
    import torch.utils.cpp_extension as cpp_extension

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    directory = tmp_path / f"llmkit_cpu_{cpu._build_key()}"
    directory.mkdir()
    (directory / "lock").touch()  # what a build killed part-way leaves
    built = []

    def load(name, build_directory, **kwargs):
        assert not (Path(build_directory) / "lock").exists()
        built.append(name)

    monkeypatch.setattr(cpp_extension, "load", load)
    cpu._load_or_build()
    assert built == [directory.name] and (directory / "ready").exists()
