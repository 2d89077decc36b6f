"""Copy a llama checkpoint into the same function with wider matrices: for tools whose kernels
need output dimensions in multiples of 64 (GPTQModel's AWQ clipping search asserts it), and
to make a trained model's step cost what a larger model's does (benchmarks/speculative.py).

- KV heads are repeated until there is one per query head (grouped-query attention with
  groups of g computes exactly what attention with each KV head repeated g times does);
- the MLP is padded with zero rows in gate/up and zero columns in down (silu(0) * 0 = 0);
- with --hidden-factor f, the hidden state is padded with zeros to f times its size: zero
  columns in the embedding, the lm_head and every projection reading it, zero rows in those
  writing it. The zeros add nothing to any product; an RMSNorm over f times the entries
  divides their sum of squares by f times more, which the norms' epsilon (divided by f) and
  weights (divided by sqrt(f), exact when f is a power of 4) undo. head_dim stays.

    python benchmarks/widen.py SRC OUT [--intermediate 192] [--hidden-factor 16]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from llmkit.checkpoint.reader import open_checkpoint
from llmkit.checkpoint.safetensors_io import TensorSpec
from llmkit.checkpoint.writer import write_checkpoint
from llmkit.quant.output import tensor_spec

# what reads the hidden state (its columns are padded) and what writes it (its rows)
READS_HIDDEN = ("embed_tokens", "lm_head", "q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
WRITES_HIDDEN = ("o_proj", "down_proj")


def widen(
    src: Path,
    out: Path,
    intermediate: int | None = None,
    hidden_factor: int = 1,
    dtype: torch.dtype | None = None,
) -> Path:
    """`src` widened into `out`; `dtype`: the tensors written in it (None: as they are)."""
    with open_checkpoint(src) as ck:
        config = dict(ck.config)
        heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
        repeat = heads // kv_heads
        pad = (intermediate or config["intermediate_size"]) - config["intermediate_size"]
        hidden = config["hidden_size"]
        extra = hidden * (hidden_factor - 1)
        specs: list[TensorSpec] = []
        for name in ck.tensors:
            tensor = ck.get_tensor(name)
            kind = name.rsplit(".", 2)[-2]
            if kind in ("k_proj", "v_proj"):
                per_head = tensor.reshape(kv_heads, -1, *tensor.shape[1:])
                tensor = per_head.repeat_interleave(repeat, dim=0).reshape(-1, *tensor.shape[1:])
            elif kind in ("gate_proj", "up_proj"):
                tensor = torch.cat([tensor, tensor.new_zeros(pad, *tensor.shape[1:])])
            elif kind == "down_proj":
                tensor = torch.cat([tensor, tensor.new_zeros(tensor.shape[0], pad)], dim=1)
            if extra and kind in READS_HIDDEN:
                tensor = torch.cat([tensor, tensor.new_zeros(tensor.shape[0], extra)], dim=1)
            elif extra and kind in WRITES_HIDDEN:
                tensor = torch.cat([tensor, tensor.new_zeros(extra, tensor.shape[1])])
            elif extra and kind.endswith("norm"):
                tensor = torch.cat([tensor, tensor.new_zeros(extra)]) / hidden_factor**0.5
            elif extra and tensor.shape and hidden in tensor.shape:
                raise SystemExit(f"widen: no rule widens {name}'s hidden size")
            specs.append(tensor_spec(name, tensor.to(dtype or tensor.dtype).contiguous()))
        config["num_key_value_heads"] = heads
        config["intermediate_size"] += pad
        if dtype is not None:
            config["torch_dtype"] = str(dtype).removeprefix("torch.")
        if extra:
            config.setdefault("head_dim", hidden // heads)
            config["hidden_size"] = hidden * hidden_factor
            config["rms_norm_eps"] /= hidden_factor
        write_checkpoint(out, specs, config, aux_from=Path(src), overwrite=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--intermediate", type=int, default=None)
    parser.add_argument("--hidden-factor", type=int, default=1)
    args = parser.parse_args()
    widen(args.src, args.out, args.intermediate, args.hidden_factor)


if __name__ == "__main__":
    main()
