"""The integer quantization methods, one module each, named as the method (`methods/gptq.py`
is `--method gptq`); the table of methods (quant/options.py `METHODS`) lists them.

A method module gives:
- `quantization_config(options) -> dict`: the `quantization_config` written into config.json;
- `pack(options, weight, scale_dtype) -> {suffix: tensor}`: one Linear's float weight
  [out, in] as the method stores it, for methods that need no calibration and for a
  quantized lm_head (methods that cannot quantize the lm_head leave it out);
- `layer_quantizer(arch, options, dtypes, errors, warn)`: for calibrated methods, the
  LayerQuantizer that quantizes one decoder layer at a time (quant/sequential.py).
- `prepare(device)`, optional: what to load before quantization's memory baseline is taken.

Option checks stay torch-free, in quant/options.py, driven by the method's table entry; the
dense tensors every method writes beside its Linears are in `dense.py`.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from llmkit.quant.options import CAST_METHODS, METHODS


def implementation(method: str) -> ModuleType:
    """The module of an integer method."""
    if method not in METHODS or method in CAST_METHODS:
        raise ValueError(f"{method!r} is not an integer quantization method")
    return importlib.import_module(f"{__name__}.{method}")
