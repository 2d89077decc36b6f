"""Read quantized checkpoints without llmkit and score them: the independent reading that
`llmkit bench quality`'s numbers are checked against.

Each layout is unpacked here from its own definition (numpy bit arithmetic on the stored
words), dequantized in float64 and run through transformers' model code in float32:
- GPTQ (`quant_method: gptq`): `qweight` [in * bits / 32, out] packed along the inputs,
  `qzeros` [groups, out * bits / 32] packed along the outputs, `scales` [groups, out],
  `g_idx` [in] (each input's group); `checkpoint_format: gptq` stores each zero minus one,
  `gptq_v2` stores it as is. w = scale * (q - zero).
- AWQ GEMM (`quant_method: awq`): `qweight` [in, out / 8] and `qzeros` [groups, out / 8],
  eight outputs per word with output 0, 2, 4, 6, 1, 3, 5, 7 in its nibbles 0..7; `scales`
  [groups, out]. w = scale * (q - zero).
- compressed-tensors `pack-quantized`: `weight_packed` [out, in * bits / 32] packed along
  the inputs, each value stored plus 2^(bits-1); `weight_zero_point` (asymmetric only)
  packed the same way along the outputs; `weight_scale` [out, groups]; `weight_g_idx`
  optional. `int-quantized` / `naive-quantized`: `weight` int8 [out, in] with the same
  scales and zero points. w = scale * (q - zero).
- Dynamic per-token int8 input activations (W8A8): each token's input to a quantized
  Linear rounded to max|x| / 127 steps, as vLLM serves them.

Prints one JSON line: {candidate path: mean KL divergence from the reference per token},
over the token windows in IDS.json, positions 0..L-2 (each predicting the next token).
Imports nothing from llmkit.

    python independent_reading.py REFERENCE IDS.json CANDIDATE...
"""

from __future__ import annotations

import argparse
import glob
import json
import os

import numpy as np
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

WINDOWS_PER_BATCH = 4
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # the output held in nibble 0..7 of an AWQ word


def unpack(words: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """Dense little-endian bit fields of int32 words, expanded along `axis` (bits 4 or 8:
    no field straddles two words)."""
    words = np.moveaxis(words.astype(np.int64) & 0xFFFFFFFF, axis, -1)
    shifts = np.arange(0, 32, bits)
    values = (words[..., None] >> shifts) & ((1 << bits) - 1)
    values = values.reshape(*words.shape[:-1], -1)
    return np.moveaxis(values, -1, axis)


def read_tensors(path: str) -> dict[str, np.ndarray]:
    """Every tensor of the checkpoint as numpy, bf16 ones widened to float32 (numpy has no
    bf16; the widening is exact)."""
    tensors = {}
    for file in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        for name, t in load_file(file).items():
            tensors[name] = (t.float() if t.dtype == torch.bfloat16 else t).numpy()
    return tensors


def dequantize_gptq(t: dict, prefix: str, config: dict) -> np.ndarray:
    bits = config["bits"]
    q = unpack(t[prefix + "qweight"], bits, 0)  # [in, out]
    zeros = unpack(t[prefix + "qzeros"], bits, 1)[:, : q.shape[1]]  # [groups, out]
    if config.get("checkpoint_format", "gptq") == "gptq":
        zeros = zeros + 1
    scales = t[prefix + "scales"].astype(np.float64)
    group = t[prefix + "g_idx"].astype(np.int64)
    w = scales[group] * (q - zeros[group])  # [in, out]
    return w.T


def dequantize_awq(t: dict, prefix: str, config: dict) -> np.ndarray:
    def columns(words):
        nibbles = unpack(words, 4, 1)  # [rows, out] with each word's nibbles in AWQ order
        rows, out = nibbles.shape
        order = np.argsort(AWQ_ORDER)  # nibble position of output 0..7
        return nibbles.reshape(rows, out // 8, 8)[:, :, order].reshape(rows, out)

    q, zeros = columns(t[prefix + "qweight"]), columns(t[prefix + "qzeros"])
    scales = t[prefix + "scales"].astype(np.float64)
    group = np.arange(q.shape[0]) // config["group_size"]
    return (scales[group] * (q - zeros[group])).T


def dequantize_compressed(t: dict, prefix: str, weights: dict) -> np.ndarray:
    bits = weights["num_bits"]
    offset = 1 << (bits - 1)
    if prefix + "weight_packed" in t:
        shape = t[prefix + "weight_shape"]
        q = unpack(t[prefix + "weight_packed"], bits, 1)[:, : shape[1]] - offset
    else:
        q = t[prefix + "weight"].astype(np.int64)
    out, inputs = q.shape
    scales = t[prefix + "weight_scale"].astype(np.float64)  # [out, groups]
    zeros = np.zeros(scales.shape, dtype=np.int64)
    if prefix + "weight_zero_point" in t:
        zp = t[prefix + "weight_zero_point"]
        zeros = (unpack(zp, bits, 0)[:out] - offset) if zp.dtype == np.int32 else zp
    if prefix + "weight_g_idx" in t:
        group = t[prefix + "weight_g_idx"].astype(np.int64)
    else:
        group = np.arange(inputs) // (inputs // scales.shape[1])
    return scales[:, group] * (q - zeros[:, group])


def compressed_weights(qc: dict) -> tuple[dict, bool]:
    """(the weights' quantization args, whether inputs are int8 per token) of the one config
    group a compressed-tensors file has."""
    (group,) = qc["config_groups"].values()
    acts = group.get("input_activations")
    per_token = bool(acts and acts.get("dynamic") and acts.get("strategy") == "token")
    if acts and not per_token:
        raise SystemExit(f"input activations {acts} are not read here")
    return group["weights"], per_token


def dequantized_state(path: str, qc: dict) -> tuple[dict, set[str], bool]:
    """(float32 state dict, names of the quantized Linears, int8 per-token inputs)."""
    t = read_tensors(path)
    method = qc["quant_method"]
    per_token = False
    if method == "gptq":
        marker, read = "qweight", lambda p: dequantize_gptq(t, p, qc)
    elif method == "awq":
        if qc.get("version", "gemm").lower() != "gemm":
            raise SystemExit(f"AWQ {qc['version']} is not read here")
        marker, read = "qweight", lambda p: dequantize_awq(t, p, qc)
    elif method == "compressed-tensors":
        weights, per_token = compressed_weights(qc)
        marker = "weight_scale"
        read = lambda p: dequantize_compressed(t, p, weights)  # noqa: E731
    else:
        raise SystemExit(f"quant_method {method} is not read here")
    linears = {name[: -len(marker) - 1] for name in t if name.endswith("." + marker)}
    state = {f"{m}.weight": torch.from_numpy(read(m + ".")).float() for m in linears}
    quant_parts = {f"{m}.{part}" for m in linears for part in PARTS}
    for name, tensor in t.items():
        if name not in quant_parts:
            state[name] = torch.from_numpy(tensor.astype(np.float32))
    return state, linears, per_token


PARTS = (
    "qweight", "qzeros", "scales", "g_idx", "weight_packed", "weight_shape", "weight_scale",
    "weight_zero_point", "weight_g_idx", "weight",
)  # fmt: skip


def per_token_int8(module, args):
    (x,) = args
    amax = x.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    return (torch.round(x / scale).clamp(-128, 127) * scale,)


def load(path: str) -> torch.nn.Module:
    config = AutoConfig.from_pretrained(path)
    qc = getattr(config, "quantization_config", None)
    if qc is not None:
        del config.quantization_config
        qc = qc if isinstance(qc, dict) else qc.to_dict()
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if qc is None:
        state, linears, per_token = read_tensors_as_float(path), set(), False
    else:
        state, linears, per_token = dequantized_state(path, qc)
    if "lm_head.weight" not in state and config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True)
    if per_token:
        for name in linears:
            model.get_submodule(name).register_forward_pre_hook(per_token_int8)
    return model.eval()


def read_tensors_as_float(path: str) -> dict:
    return {n: torch.from_numpy(t.astype(np.float32)) for n, t in read_tensors(path).items()}


def logprobs(model, ids: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(model(ids).logits[:, :-1].double(), dim=-1)


def mean_kld(reference, candidate, ids: torch.Tensor) -> float:
    total, count = 0.0, 0
    for start in range(0, len(ids), WINDOWS_PER_BATCH):
        batch = ids[start : start + WINDOWS_PER_BATCH]
        ref = logprobs(reference, batch)
        kld = (ref.exp() * (ref - logprobs(candidate, batch))).sum(-1)
        total, count = total + float(kld.sum()), count + kld.numel()
    return total / count


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("reference")
    parser.add_argument("ids", help="JSON list of token-id windows, all the same length")
    parser.add_argument("candidates", nargs="+")
    args = parser.parse_args()
    with open(args.ids) as f:
        ids = torch.tensor(json.load(f), dtype=torch.long)
    reference = load(args.reference)
    with torch.no_grad():
        klds = {path: mean_kld(reference, load(path), ids) for path in args.candidates}
    print(json.dumps(klds))


if __name__ == "__main__":
    main()
