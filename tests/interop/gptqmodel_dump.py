"""Load a GPTQ or AWQ checkpoint with GPTQModel and save what it computes, for the interop tests.

Runs inside the gptqmodel venv (benchmarks/setup_reference_venvs.sh gptqmodel), never
inside llmkit's. Saves {"logits": [batch, seq, vocab] float32, "weights": {module name:
dequantized weight [out, in] as GPTQModel unpacks it}} with torch.save.

    python gptqmodel_dump.py CHECKPOINT IDS.json OUT.pt [torch|awq_torch]
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    import torch
    from gptqmodel import BACKEND, GPTQModel

    path, ids_path, out = sys.argv[1:4]
    backend = BACKEND.AWQ_TORCH if sys.argv[4:] == ["awq_torch"] else BACKEND.TORCH
    with open(ids_path) as f:
        ids = torch.tensor(json.load(f))
    # GPTQModel's CPU kernels compute in float16 or bfloat16; float16 keeps more mantissa.
    model = GPTQModel.load(path, device="cpu", backend=backend, dtype=torch.float16)
    weights = {}
    for name, module in model.model.named_modules():
        if hasattr(module, "qweight"):
            weights[name] = dequantized(module).T.float().contiguous()
    with torch.no_grad():
        logits = model(ids).logits.float()
    torch.save({"logits": logits, "weights": weights}, out)


def dequantized(module):
    """[in, out] float16, as the module's own kernel unpacks it."""
    if hasattr(module, "dequantize_weight"):
        return module.dequantize_weight()
    from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm

    return dequantize_gemm(
        module.qweight, module.qzeros, module.scales, module.bits, module.group_size
    )


if __name__ == "__main__":
    main()
