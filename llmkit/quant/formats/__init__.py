"""On-disk formats: pack, unpack and config for each (GPTQ v1, compressed-tensors)."""
