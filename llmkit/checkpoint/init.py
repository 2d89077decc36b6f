"""`llmkit init`: random-init checkpoints of known shapes, with a tokenizer, made offline."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from llmkit.checkpoint import dtypes
from llmkit.checkpoint.atomic import atomic_output_dir
from llmkit.checkpoint.safetensors_io import TensorSpec
from llmkit.checkpoint.tokenizer import BOS_ID, EOS_ID, PAD_ID, write_tokenizer
from llmkit.checkpoint.writer import ProgressFn, WrittenCheckpoint, write_json, write_tensors
from llmkit.errors import LlmkitError


@dataclass(frozen=True, slots=True)
class Preset:
    """The shape of a model; `extra` holds config keys specific to its architecture."""

    model_type: str
    architecture: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    # Larger than the usual 0.02 for tiny models so logits are peaked and greedy decoding
    # is not decided by float noise in tests.
    initializer_range: float = 0.1
    extra: dict = field(default_factory=dict)


PRESETS: dict[str, Preset] = {
    "tiny-llama": Preset("llama", "LlamaForCausalLM", 64, 2, 4, 2, 128, 512, 512),
    "tiny-qwen2": Preset(
        "qwen2",
        "Qwen2ForCausalLM",
        64,
        2,
        4,
        2,
        128,
        512,
        512,
        tie_word_embeddings=True,
        extra={"rope_theta": 1_000_000.0, "use_sliding_window": False},
    ),
    "tiny-mistral": Preset(
        "mistral",
        "MistralForCausalLM",
        64,
        2,
        4,
        2,
        128,
        500,
        512,
        extra={"sliding_window": None},
    ),
    "tiny-qwen3": Preset(
        "qwen3",
        "Qwen3ForCausalLM",
        64,
        2,
        4,
        2,
        128,
        512,
        512,
        extra={"head_dim": 16, "rope_theta": 1_000_000.0, "use_sliding_window": False},
    ),
    "small-llama": Preset(
        "llama", "LlamaForCausalLM", 768, 12, 12, 4, 2048, 32000, 2048, initializer_range=0.02
    ),
}
DTYPES = ("float32", "float16", "bfloat16")


def preset_config(preset: Preset, dtype: str = "float32") -> dict:
    """The config.json contents for a preset (torch-free)."""
    return {
        "architectures": [preset.architecture],
        "model_type": preset.model_type,
        "hidden_size": preset.hidden_size,
        "num_hidden_layers": preset.num_hidden_layers,
        "num_attention_heads": preset.num_attention_heads,
        "num_key_value_heads": preset.num_key_value_heads,
        "intermediate_size": preset.intermediate_size,
        "vocab_size": preset.vocab_size,
        "max_position_embeddings": preset.max_position_embeddings,
        "tie_word_embeddings": preset.tie_word_embeddings,
        "initializer_range": preset.initializer_range,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
        "torch_dtype": dtype,
        "dtype": dtype,
        **preset.extra,
    }


def random_state_dict(config: dict, seed: int) -> dict:
    """Weights of transformers' own init for `config`, seeded; norms and biases varied too."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_config = AutoConfig.for_model(**config)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    state = model.state_dict()
    if config["tie_word_embeddings"]:
        state.pop("lm_head.weight", None)
    # transformers initialises norms to 1 and biases to 0; vary them so tests notice when
    # a norm or a bias is dropped or applied twice.
    generator = torch.Generator().manual_seed(seed + 1)
    for name, tensor in state.items():
        if name.endswith("norm.weight"):
            tensor.add_(0.1 * torch.randn(tensor.shape, generator=generator))
        elif name.endswith(".bias"):
            tensor.copy_(0.02 * torch.randn(tensor.shape, generator=generator))
    return state


def init_checkpoint(
    out: Path,
    preset: str,
    seed: int = 0,
    dtype: str = "float32",
    overwrite: bool = False,
    progress: ProgressFn | None = None,
) -> WrittenCheckpoint:
    """Write a random-init checkpoint of `preset` (see PRESETS) with a trained tokenizer."""
    if preset not in PRESETS:
        raise LlmkitError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if dtype not in DTYPES:
        raise LlmkitError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    shape = PRESETS[preset]
    config = preset_config(shape, dtype)
    with atomic_output_dir(Path(out), overwrite) as tmp:
        state = random_state_dict(config, seed)
        code = dtypes.NAME_TO_CODE[dtype]
        specs = [_spec(name, tensor, code) for name, tensor in state.items()]
        write_tokenizer(tmp, shape.vocab_size, shape.max_position_embeddings)
        generation = {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID}
        write_json(tmp / "generation_config.json", generation)
        write_json(tmp / "config.json", config)
        shards = write_tensors(tmp, specs, progress=progress)
    return WrittenCheckpoint(Path(out).absolute(), shards, len(specs), sum(s.nbytes for s in specs))


def _spec(name: str, tensor: object, code: str) -> TensorSpec:
    dtype = dtypes.to_torch(code)
    return TensorSpec(name, code, tuple(tensor.shape), lambda: [tensor.to(dtype)])


def count_parameters(preset: str) -> int:
    """Parameters of a preset without materialising it (meta device)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**preset_config(PRESETS[preset]))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())
