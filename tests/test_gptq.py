"""The GPTQ algorithm on single Linear layers, against RTN and its own invariants."""

from __future__ import annotations

import pytest
import torch

from llmkit.errors import LlmkitError
from llmkit.quant import gptq, int8, rtn
from llmkit.quant.formats import gptq as gptq_format


def correlated_inputs(seed: int, in_features: int = 128, tokens: int = 2048, skew: float = 1.0):
    """Inputs mixed across channels (so the Hessian is far from diagonal), with per-channel
    scales spread over 10**(±skew)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(in_features, in_features, generator=g) * 0.3 + torch.eye(in_features)
    scales = torch.logspace(-skew, skew, in_features)[torch.randperm(in_features, generator=g)]
    return (mix @ torch.randn(in_features, tokens, generator=g)).T * scales


def hessian_error(w: torch.Tensor, approx: torch.Tensor, H: torch.Tensor) -> float:
    """||(W - Ŵ) X||² / ||W X||² from H ∝ X Xᵀ, in float64: the reference."""
    delta, w, H = (w - approx).double(), w.double(), H.double()
    return float(((delta @ H) * delta).sum() / ((w @ H) * w).sum())


def hessian_of(x: torch.Tensor) -> torch.Tensor:
    h = gptq.Hessian(x.shape[1], torch.device("cpu"))
    for batch in x.split(300):
        h.add(batch)
    return h.matrix


@pytest.mark.parametrize("block", [512, 8, 12])  # one block; whole blocks; a ragged last one
def test_hessian_accumulates_2xxt_over_n(block, monkeypatch):
    monkeypatch.setattr(gptq.Hessian, "BLOCK", block)
    x = correlated_inputs(0, in_features=32, tokens=1000)
    expected = 2 * x.double().T @ x.double() / 1000
    assert torch.allclose(hessian_of(x).double(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("group_size", [32, -1])
def test_gptq_beats_rtn_on_correlated_inputs(bits, group_size):
    x = correlated_inputs(1)
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(2)) * 0.05
    H = hessian_of(x)
    result = gptq.quantize(w, H, gptq.GPTQSettings(bits=bits, group_size=group_size))
    size = 128 if group_size == -1 else group_size
    baseline = rtn.quantize_groups(w, bits, size, sym=True, min_zero=1).dequantize()

    def output_error(approx):  # ||W X - Ŵ X|| on the calibration inputs themselves
        return float((x @ (w - approx).T).norm())

    assert output_error(result.dequantize()) < output_error(baseline)
    relative = result.relative_error()
    assert relative == pytest.approx(
        output_error(result.dequantize()) ** 2 / float((x @ w.T).norm()) ** 2, rel=1e-3
    )


def test_a_fixed_grid_is_kept_and_beats_rounding_to_it():
    """W8A8's symmetric int8 grid (scale max|w| / 127, zero 127, maxq 254): every weight
    lands on it, the scales come back as given, and the output error on the calibration
    inputs is below rounding each weight to its nearest point of the same grid."""
    x = correlated_inputs(3)
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(4)) * 0.05
    q8, scale = int8.quantize_per_channel(w, torch.bfloat16)
    grid = gptq.Grid(scale.float().flatten(), torch.full((64,), 127.0), 254)
    settings = gptq.GPTQSettings(bits=8, group_size=-1, act_group_aware=False, clip_search=False)
    result = gptq.quantize(w, hessian_of(x), settings, grid=grid)
    assert int(result.q.min()) >= 0 and int(result.q.max()) <= 254
    assert torch.equal(result.scales.flatten(), grid.scale)
    approx = (result.q.double() - 127) * scale.double()
    assert torch.equal(result.dequantize().double(), approx)
    nearest = q8.double() * scale.double()
    assert hessian_error(w, approx, hessian_of(x)) < hessian_error(w, nearest, hessian_of(x))
    with pytest.raises(ValueError, match="group_size must be -1"):
        gptq.quantize(w, hessian_of(x), gptq.GPTQSettings(group_size=32), grid=grid)


@pytest.mark.parametrize("seed", range(5))
def test_act_order_never_worse_on_skewed_activation_scales(seed):
    x = correlated_inputs(seed, skew=1.5)
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(seed + 10)) * 0.05
    H = hessian_of(x)
    plain = gptq.quantize(w, H, gptq.GPTQSettings(group_size=32))
    ordered = gptq.quantize(w, H, gptq.GPTQSettings(group_size=32, desc_act=True))
    error = lambda result: hessian_error(w, result.dequantize(), H)  # noqa: E731
    assert error(ordered) <= error(plain)
    assert not torch.equal(ordered.g_idx, torch.arange(128, dtype=torch.int32) // 32)


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("desc_act", [False, True])
def test_pack_unpack_round_trip_is_bit_exact(bits, sym, desc_act):
    x = correlated_inputs(3, in_features=64)
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(4)) * 0.05
    result = gptq.quantize(
        w, hessian_of(x), gptq.GPTQSettings(bits=bits, group_size=32, sym=sym, desc_act=desc_act)
    )
    packed = gptq_format.pack(result.q, result.scales, result.zeros, bits, result.g_idx)
    q, zeros = gptq_format.unpack(packed["qweight"], packed["qzeros"], bits)
    assert torch.equal(q, result.q.long()) and torch.equal(zeros, result.zeros.long())
    assert torch.equal(packed["g_idx"], result.g_idx)
    dequantized = gptq_format.dequantize(**{k: packed[k] for k in gptq_format.SUFFIXES}, bits=bits)
    assert torch.equal(dequantized, result.dequantize())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("rows", [64, 70])
def test_packing_paths_agree_with_the_bitstream_at_once(bits, rows):
    """Widths that divide 32 pack whole words a field at a time (where the packed dim fills
    them); the others, and ragged ends, take the bitstream in column chunks. Both give the
    bitstream packing of all columns at once, from uint8 or int64 values, either dim."""
    from llmkit.quant.formats import bitpack

    g = torch.Generator().manual_seed(bits + rows)
    values = torch.randint(0, 2**bits, (rows, 2 * bitpack.PACK_COLUMNS + 7), generator=g)
    stream = bitpack._pack_columns(values, bits)
    for given in (values, values.to(torch.uint8)):
        assert torch.equal(bitpack.pack(given, bits), stream)
        assert torch.equal(bitpack.pack_last(given.t(), bits), stream.t())
    assert torch.equal(bitpack.unpack(stream, bits, rows), values)


def test_static_groups_keep_groups_in_input_order_under_act_order():
    x = correlated_inputs(5, in_features=64)
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(6)) * 0.05
    settings = gptq.GPTQSettings(
        group_size=16, desc_act=True, static_groups=True, clip_search=False
    )
    result = gptq.quantize(w, hessian_of(x), settings)
    assert torch.equal(result.g_idx, torch.arange(64, dtype=torch.int32) // 16)
    rtn_scales = rtn.quantize_groups(w, 4, 16, True, min_zero=1).scales
    assert torch.equal(result.scales, rtn_scales)  # fitted once, on the original weights


def test_dead_inputs_get_zero_weight():
    x = correlated_inputs(7, in_features=32)
    x[:, 5] = 0
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(8))
    result = gptq.quantize(w, hessian_of(x), gptq.GPTQSettings(group_size=-1))
    assert torch.allclose(result.dequantize()[:, 5], torch.zeros(8), atol=1e-6)


@pytest.mark.parametrize(
    "settings",
    [
        gptq.GPTQSettings(group_size=16),
        gptq.GPTQSettings(bits=3, group_size=-1, sym=False),
        gptq.GPTQSettings(group_size=16, desc_act=True, static_groups=True),
        gptq.GPTQSettings(bits=8, group_size=32, act_group_aware=False, damp_percent=0.1),
    ],
)
def test_errors_from_the_sweep_equal_the_hessian_form(settings):
    """Each row's error, taken from the sweep's own losses, equals (w - ŵ) H (w - ŵ)ᵀ
    computed afresh in float64 (with a dead input in the mix)."""
    x = correlated_inputs(9, in_features=64, skew=1.5)
    x[:, 7] = 0
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(10)) * 0.05
    H = hessian_of(x)
    result = gptq.quantize(w, H, settings)
    delta = (w - result.dequantize()).double()
    expected = ((delta @ H.double()) * delta).sum(1)
    assert torch.allclose(result.row_error, expected, rtol=1e-3, atol=1e-9)
    assert torch.allclose(result.row_energy, ((w.double() @ H.double()) * w.double()).sum(1))
    reference = hessian_error(w, result.dequantize(), H)
    assert result.relative_error() == pytest.approx(reference, rel=1e-3)
    assert result.relative_error(slice(0, 8)) != pytest.approx(reference, rel=1e-2)


@pytest.mark.parametrize(
    "settings",
    [
        gptq.GPTQSettings(group_size=16),
        gptq.GPTQSettings(group_size=16, desc_act=True, static_groups=True, sym=False),
    ],
)
def test_rows_swept_in_blocks_equal_one_sweep(settings, monkeypatch):
    """Rows are swept a block at a time (a ragged last block here); each row's result is the
    one a sweep of the whole matrix gives, and writing the dequantized weight into a tensor
    gives `dequantize()`."""
    x = correlated_inputs(11, in_features=64)
    x[:, 3] = 0
    w = torch.randn(40, 64, generator=torch.Generator().manual_seed(12)) * 0.05
    H = hessian_of(x)
    whole = gptq.quantize(w, H, settings)
    monkeypatch.setattr(gptq, "QUANTIZE_ROWS", 16)
    monkeypatch.setattr(gptq, "ROW_BLOCK", 16)
    blocks = gptq.quantize(w, H, settings)
    for field in ("q", "scales", "zeros", "g_idx"):
        assert torch.equal(getattr(blocks, field), getattr(whole, field)), field
    assert torch.allclose(blocks.row_error, whole.row_error, rtol=1e-5, atol=1e-12)
    out = torch.full_like(w, float("nan")).double()
    blocks.dequantize_into(out)
    assert torch.equal(out, blocks.dequantize().double())


def test_cuda_loops_take_taller_blocks():
    """On CUDA a loop's cost is its launches, so rows go together up to a memory bound (the
    test above shows the block size leaves every result as it is)."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert rtn.rows_at_once(2048, cpu, gptq.QUANTIZE_ROWS) == gptq.QUANTIZE_ROWS
    assert rtn.rows_at_once(2048, cuda, gptq.QUANTIZE_ROWS) == rtn.CUDA_BLOCK_BYTES // 8192
    assert rtn.rows_at_once(2**24, cuda, gptq.ROW_BLOCK) == gptq.ROW_BLOCK


@pytest.mark.parametrize("sym", [True, False])
def test_clip_search_picks_alike_whatever_factors_go_together(sym, monkeypatch):
    """The search's factors go in batches (FACTORS_AT_ONCE on the CPU, all of them on CUDA):
    any batching picks the same scale and zero bit for bit, on rows with an outlier and on
    degenerate ones (zeros, a constant, four levels)."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(48, 32, generator=g)
    w[torch.arange(48), torch.randint(0, 32, (48,), generator=g)] *= 5
    w[0], w[1], w[2] = 0, 0.25, torch.arange(32) % 4 - 1.5
    picks = []
    for at_once in (1, 3, 5, 20):
        monkeypatch.setattr(rtn, "FACTORS_AT_ONCE", at_once)
        picks.append(rtn.searched_group_params(w, 4, sym, torch.float16))
    for scale, zero in picks[1:]:
        assert torch.equal(scale, picks[0][0]) and torch.equal(zero, picks[0][1])


def test_cholesky_failure_raises_damping_and_warns():
    # A Hessian with a negative eigenvalue (a calibration-time numerical accident): the
    # default damping cannot fix it; doubling it a few times can.
    H = torch.eye(16)
    H[3, 3] = -0.05
    messages = []
    result = gptq.quantize(
        torch.randn(4, 16),
        H,
        gptq.GPTQSettings(group_size=-1),
        name="model.layers.7.mlp.down_proj",
        warn=messages.append,
    )
    assert result.damp_percent > 0.01
    assert messages and all("model.layers.7.mlp.down_proj" in m for m in messages)
    assert "Cholesky failed" in messages[0]


@pytest.mark.parametrize("failing", [False, True])
@pytest.mark.parametrize(
    "settings", [gptq.GPTQSettings(group_size=16), gptq.GPTQSettings(group_size=16, desc_act=True)]
)
def test_factorizing_in_place_equals_factorizing_a_copy(failing, settings):
    """Given a way to rebuild H, quantize factorizes the caller's matrix itself (permuted in
    place) and a retry factorizes a rebuilt one; the result is the copy path's. `failing`:
    a Hessian only a higher damping factorizes, so the retry runs."""
    x = correlated_inputs(13, in_features=64)
    x[:, 9] = 0
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(14)) * 0.05
    H = hessian_of(x)
    if failing:
        H[20, 20] = -0.02 * float(H.diagonal().mean())
    rebuilt = []

    def again():
        rebuilt.append(True)
        return H.clone()

    retries = []
    copied = gptq.quantize(w, H, settings, warn=retries.append)
    in_place = gptq.quantize(w, H.clone(), settings, again=again)
    assert len(rebuilt) == len(retries) and bool(retries) == failing  # one rebuild a retry
    for field in ("q", "scales", "zeros", "g_idx"):
        assert torch.equal(getattr(in_place, field), getattr(copied, field)), field
    assert in_place.damp_percent == copied.damp_percent


def test_hopeless_hessian_is_reported():
    with pytest.raises(LlmkitError, match="not positive definite"):
        gptq.quantize(
            torch.randn(4, 8), -torch.eye(8), gptq.GPTQSettings(group_size=-1), name="layer"
        )


@pytest.mark.parametrize("seed", range(5))
def test_group_aware_reordering_keeps_groups_and_lowers_error(seed):
    x = correlated_inputs(seed)
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(seed + 10)) * 0.05
    H = hessian_of(x)
    plain = gptq.quantize(w, H, gptq.GPTQSettings(group_size=32, act_group_aware=False))
    reordered = gptq.quantize(w, H, gptq.GPTQSettings(group_size=32, act_group_aware=True))
    assert torch.equal(reordered.g_idx, torch.arange(128, dtype=torch.int32) // 32)
    error = lambda result: hessian_error(w, result.dequantize(), H)  # noqa: E731
    assert error(reordered) < error(plain)


def test_clip_search_lowers_rounding_error_on_outlier_groups():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 32, generator=g)
    w[torch.arange(64), torch.randint(0, 32, (64,), generator=g)] *= 6  # one outlier a row
    plain = rtn.group_params(w, 4, True, torch.float16)
    searched = rtn.searched_group_params(w, 4, True, torch.float16)

    def error(params):
        scale, zero = params
        q = (torch.round(w / scale[:, None]) + zero[:, None]).clamp(0, 15)
        return ((q - zero[:, None]) * scale[:, None] - w).abs().pow(2.4).sum(dim=1)

    assert bool((error(searched) <= error(plain)).all())
    assert float(error(searched).sum()) < 0.95 * float(error(plain).sum())
    assert bool((searched[0] <= plain[0]).all())  # it only ever shrinks the range
