"""Copy a llama checkpoint into the same function with wider matrices, for tools whose kernels
need output dimensions in multiples of 64 (GPTQModel's AWQ clipping search asserts it).

- KV heads are repeated until there is one per query head (grouped-query attention with
  groups of g computes exactly what attention with each KV head repeated g times does);
- the MLP is padded with zero rows in gate/up and zero columns in down (silu(0) * 0 = 0).

    python benchmarks/widen.py SRC OUT [--intermediate 192]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from llmkit.checkpoint.reader import open_checkpoint
from llmkit.checkpoint.safetensors_io import TensorSpec
from llmkit.checkpoint.writer import write_checkpoint
from llmkit.quant.output import tensor_spec


def widen(src: Path, out: Path, intermediate: int | None = None) -> Path:
    with open_checkpoint(src) as ck:
        config = dict(ck.config)
        heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
        repeat = heads // kv_heads
        pad = (intermediate or config["intermediate_size"]) - config["intermediate_size"]
        specs: list[TensorSpec] = []
        for name in ck.tensors:
            tensor = ck.get_tensor(name)
            if ".k_proj." in name or ".v_proj." in name:
                per_head = tensor.reshape(kv_heads, -1, *tensor.shape[1:])
                tensor = per_head.repeat_interleave(repeat, dim=0).reshape(-1, *tensor.shape[1:])
            elif ".gate_proj." in name or ".up_proj." in name:
                tensor = torch.cat([tensor, tensor.new_zeros(pad, *tensor.shape[1:])])
            elif ".down_proj." in name:
                tensor = torch.cat([tensor, tensor.new_zeros(tensor.shape[0], pad)], dim=1)
            specs.append(tensor_spec(name, tensor.contiguous()))
        config["num_key_value_heads"] = heads
        config["intermediate_size"] += pad
        write_checkpoint(out, specs, config, aux_from=Path(src), overwrite=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--intermediate", type=int, default=None)
    args = parser.parse_args()
    widen(args.src, args.out, args.intermediate)


if __name__ == "__main__":
    main()
