"""Load a GPTQ checkpoint with GPTQModel and save what it computes, for the interop tests.

Runs inside the gptqmodel venv (benchmarks/setup_reference_venvs.sh gptqmodel), never
inside llmkit's. Saves {"logits": [batch, seq, vocab] float32, "weights": {module name:
dequantized weight [out, in] as GPTQModel unpacks it}} with torch.save.

    python gptqmodel_dump.py CHECKPOINT IDS.json OUT.pt
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    import torch
    from gptqmodel import BACKEND, GPTQModel

    path, ids_path, out = sys.argv[1:4]
    with open(ids_path) as f:
        ids = torch.tensor(json.load(f))
    # GPTQModel's CPU kernel computes in float16 or bfloat16; float16 keeps more mantissa.
    model = GPTQModel.load(path, device="cpu", backend=BACKEND.TORCH, dtype=torch.float16)
    weights = {}
    for name, module in model.model.named_modules():
        if hasattr(module, "dequantize_weight") and hasattr(module, "qweight"):
            weights[name] = module.dequantize_weight().T.float().contiguous()
    with torch.no_grad():
        logits = model(ids).logits.float()
    torch.save({"logits": logits, "weights": weights}, out)


if __name__ == "__main__":
    main()
