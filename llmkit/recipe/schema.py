"""What a recipe may say, checked before anything runs: unknown keys, wrong types and
impossible combinations are reported with the file, the line and the key."""

from __future__ import annotations

import dataclasses
import inspect
import json
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from llmkit.arch.plan import DEFAULT_VOCAB_PAD
from llmkit.bench.compare import CompareSpec
from llmkit.bench.offline import OfflineSpec
from llmkit.bench.quality import evaluate_quality
from llmkit.errors import LlmkitError
from llmkit.quant.calibration import CalibrationSpec
from llmkit.quant.options import CAST_METHODS, METHODS, MethodOptions, check_options
from llmkit.recipe.yaml_lines import line_of, load_with_lines
from llmkit.runtime.engine_config import (
    ANY,
    DRAFT,
    MAX_NGRAM,
    MAX_SPECULATIVE_TOKENS,
    NGRAM,
    EngineConfig,
    untuned,
)
from llmkit.runtime.lora_registry import adapter_dir

STRICT = ConfigDict(extra="forbid")
# A step's defaults are the command's, read from where the library keeps them.
OFFLINE, COMPARE, CALIBRATION = OfflineSpec(), CompareSpec(), CalibrationSpec()
QUALITY_WINDOWS = inspect.signature(evaluate_quality).parameters["num_windows"].default


def _model_of(dataclass: type, name: str) -> type[BaseModel]:
    """A strict pydantic model with a dataclass's fields, types and defaults."""
    hints = typing.get_type_hints(dataclass)
    fields = {f.name: (hints[f.name], f.default) for f in dataclasses.fields(dataclass)}
    return create_model(name, __config__=STRICT, **fields)


# Each method's options, from its options dataclass (quant/options.py).
OPTION_MODELS = {name: _model_of(m.options, f"{name} options") for name, m in METHODS.items()}
CalibrationModel = _model_of(CalibrationSpec, "Calibration")


class Source(BaseModel):
    """Exactly one of: `init` (a preset, offline), `path` (a directory), `hub` (an id)."""

    model_config = STRICT
    init: str | None = None
    path: str | None = None
    hub: str | None = None
    revision: str | None = None
    seed: int = 0
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"

    @model_validator(mode="after")
    def _one(self) -> Source:
        if sum(x is not None for x in (self.init, self.path, self.hub)) != 1:
            raise ValueError("give exactly one of init, path and hub")
        return self


class Quantize(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    method: Literal[tuple(METHODS)]  # type: ignore[valid-type]
    from_: str = Field("source", alias="from")
    options: dict[str, Any] = Field(default_factory=dict)  # checked against the method's
    calibration: CalibrationModel = Field(default_factory=CalibrationModel)  # type: ignore[valid-type]
    device: str = "auto"

    def method_options(self) -> MethodOptions:
        """The method's options (a ValidationError or LlmkitError names what is wrong)."""
        values = OPTION_MODELS[self.method].model_validate(self.options).model_dump()
        options = METHODS[self.method].options(**values)
        check_options(self.method, options)
        return options


class Shard(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    from_: str = Field("source", alias="from")
    tp: int = Field(1, ge=1)
    pp: int = Field(1, ge=1)
    vocab_pad: int = Field(DEFAULT_VOCAB_PAD, ge=1)


class Quality(BaseModel):
    model_config = STRICT
    reference: str = "source"
    candidates: list[str] = Field(min_length=1)
    num_windows: int = Field(QUALITY_WINDOWS, ge=0)
    seq_len: int = Field(CALIBRATION.seq_len, ge=8)


# what each of engine_config.TUNES' proposers is in a recipe's words
SPECULATIVE_WORDS = {ANY: "speculative", NGRAM: f"speculative: {NGRAM}",
                     DRAFT: "a draft model as speculative"}  # fmt: skip


class Speculating(BaseModel):
    """Speculative decoding for the engine a bench runs: `speculative` is ngram or an
    earlier checkpoint's id (source included) as the draft model; the other fields are the
    engine options of the same names (`--ngram-min` for ngram_min), each taken only with
    what it tunes."""

    model_config = STRICT
    speculative: str | None = Field(None, min_length=1)
    num_speculative_tokens: int | None = Field(None, ge=1, le=MAX_SPECULATIVE_TOKENS)
    speculative_max_seqs: int | None = Field(None, ge=0)
    ngram_min: int | None = Field(None, ge=1, le=MAX_NGRAM)
    ngram_max: int | None = Field(None, ge=1, le=MAX_NGRAM)
    draft_min_confidence: float | None = Field(None, ge=0, le=1)

    @model_validator(mode="after")
    def _drafts(self) -> Speculating:
        for field in self.engine_fields():
            if (wants := untuned(field, self.speculative)) is not None:
                raise ValueError(f"{field} goes with {SPECULATIVE_WORDS[wants]}")
        if self.speculative is not None:  # what the engine checks across its options
            try:
                EngineConfig(speculative=self.speculative, **self.engine_fields())
            except LlmkitError as e:
                raise ValueError(str(e)) from None
        return self

    def engine_fields(self) -> dict:
        """The engine options set besides `speculative`, by EngineConfig field."""
        fields = set(Speculating.model_fields) - {"speculative"}
        return {f: getattr(self, f) for f in sorted(fields) if getattr(self, f) is not None}

    def draft(self) -> str | None:
        """The checkpoint id of the draft model, if there is one."""
        return None if self.speculative in (None, NGRAM) else self.speculative


class Offline(Speculating):
    model: str = "source"
    batch_sizes: list[int] = Field(default_factory=lambda: [*OFFLINE.batch_sizes], min_length=1)
    input_len: list[int] = Field(default_factory=lambda: [*OFFLINE.input_lens], min_length=1)
    output_len: list[int] = Field(default_factory=lambda: [*OFFLINE.output_lens], min_length=1)
    lora: str | None = None  # a PEFT adapter directory every request runs with


class Compare(BaseModel):
    model_config = STRICT
    checkpoints: list[str] = Field(min_length=2)
    concurrency: int = Field(COMPARE.concurrency, ge=1)
    input_len: int = Field(COMPARE.input_len, ge=1)
    output_len: int = Field(COMPARE.output_len, ge=2)
    num_windows: int = Field(COMPARE.num_windows, ge=0)
    seq_len: int = Field(CALIBRATION.seq_len, ge=8)


class Serve(Speculating):
    """Load-test `model` (served by `llmkit serve` for the duration of the step) or `url`."""

    model: str | None = None
    url: str | None = None
    num_prompts: int = Field(32, ge=1)
    request_rate: float | Literal["inf"] = "inf"
    burstiness: float = Field(1.0, gt=0)
    max_concurrency: int | None = Field(None, ge=1)
    input_len: int | str = "16-64"  # tokens, or a range like 16-64
    output_len: int | str = 32
    ignore_eos: bool = True
    seed: int = 0
    endpoint: Literal["completions", "chat"] = "completions"
    lora: str | None = None  # with model: a PEFT adapter directory served with it and asked for
    served_model: str | None = None  # with url: the model (or adapter) name to ask for

    @model_validator(mode="after")
    def _one(self) -> Serve:
        if (self.model is None) == (self.url is None):
            raise ValueError("give exactly one of model (served for the step) and url")
        if self.lora is not None and self.model is None:
            raise ValueError("lora goes with model; with url, name the adapter in served_model")
        if self.served_model is not None and self.url is None:
            raise ValueError("served_model goes with url")
        if self.speculative is not None and self.model is None:
            raise ValueError("speculative goes with model; a server at url runs as it was started")
        return self


class Bench(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    quality: Quality | None = None
    offline: Offline | None = None
    compare: Compare | None = None
    serve: Serve | None = None
    assert_: list[str] = Field(default_factory=list, alias="assert")

    @model_validator(mode="after")
    def _one(self) -> Bench:
        if sum(x is not None for x in (self.quality, self.offline, self.compare, self.serve)) != 1:
            raise ValueError("give exactly one of quality, offline, compare and serve")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("quality", "offline", "compare", "serve") if getattr(self, k))

    @property
    def lora(self) -> str | None:
        """The adapter directory the bench runs with, if any."""
        return getattr(getattr(self, self.kind), "lora", None)


class Step(BaseModel):
    model_config = STRICT
    id: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    quantize: Quantize | None = None
    shard: Shard | None = None
    bench: Bench | None = None

    @field_validator("id")
    @classmethod
    def _one_component(cls, value: str) -> str:
        if value in (".", ".."):  # outputs/<id> would be outputs/ itself, or above it
            raise ValueError("a step id may not be . or ..")
        return value

    @model_validator(mode="after")
    def _one(self) -> Step:
        if sum(x is not None for x in (self.quantize, self.shard, self.bench)) != 1:
            raise ValueError("give exactly one of quantize, shard and bench")
        return self

    @property
    def kind(self) -> str:
        return "quantize" if self.quantize else "shard" if self.shard else "bench"

    def definition(self) -> dict:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class Recipe(BaseModel):
    model_config = STRICT
    name: str
    description: str = ""
    source: Source
    outputs: str
    steps: list[Step] = Field(min_length=1)


def load_recipe(path: Path, overrides: list[str] = ()) -> Recipe:
    """Read, override (`key.path=value`), and check a recipe; errors name file:line: key."""
    source = str(path)
    if not path.is_file():
        raise LlmkitError(f"{source}: no such recipe file")
    data, lines = load_with_lines(path.read_text(), source)
    for override in overrides:
        _apply(data, override)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        raise _error(source, lines, first["loc"], first["msg"]) from None
    for loc, message in _problems(recipe):
        raise _error(source, lines, loc, message)
    return recipe


def _error(source: str, lines, loc: tuple, message: str) -> LlmkitError:
    line = line_of(lines, tuple(loc))
    where = f"{source}:{line}" if line else source
    key = ".".join(str(x) for x in loc) or "(top level)"
    return LlmkitError(f"{where}: {key}: {message}")


def _apply(data: Any, override: str) -> None:
    """--set a.b.0.c=value (list items by index or by step id); the value is YAML."""
    key, sep, text = override.partition("=")
    if not sep or not key:
        raise LlmkitError(f"--set {override!r}: write it as key.path=value")
    parts = key.split(".")
    node = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            index = _index(node, part, override)
            if last:
                node[index] = yaml.safe_load(text)
            node = node[index]
        elif isinstance(node, dict):
            if last:
                node[part] = yaml.safe_load(text)
            node = node.setdefault(part, {}) if not last else node
        else:
            raise LlmkitError(f"--set {override!r}: {'.'.join(parts[:i])} is not a mapping")


def _index(items: list, part: str, override: str) -> int:
    if part.isdigit() and int(part) < len(items):
        return int(part)
    for i, item in enumerate(items):
        if isinstance(item, dict) and item.get("id") == part:
            return i
    raise LlmkitError(f"--set {override!r}: no list item {part!r}")


def _problems(recipe: Recipe):
    """(location, message) of each impossible combination."""
    yield from _source_problems(recipe)
    made: dict[str, str] = {"source": "full"}  # step id -> what it made
    for i, step in enumerate(recipe.steps):
        at = ("steps", i)
        if step.id in made:
            yield (*at, "id"), f"step id {step.id!r} is used twice (or is 'source')"
        for key, ref in references(step):
            where = (*at, step.kind, *key)
            if made.get(ref) in (None, "bench"):
                known = ", ".join(k for k, v in made.items() if v != "bench")
                yield where, f"{ref!r} is no earlier checkpoint; known: {known}"
            elif step.quantize and made[ref] != "full":
                yield where, f"quantize from a full-precision checkpoint, not {ref!r} ({made[ref]})"
            elif key[-1] == "speculative" and made[ref] == "sharded":
                yield where, f"a draft model runs whole: {ref!r} is sharded"
        if step.quantize:
            yield from _option_problems(step.quantize, (*at, "quantize", "options"))
        if step.shard:
            yield from _shard_problems(recipe, step, at)
        if step.bench:
            yield from _assert_problems(step, at)
            if step.bench.lora is not None:
                try:
                    adapter_dir(step.bench.lora)
                except LlmkitError as e:
                    yield (*at, "bench", step.bench.kind, "lora"), str(e)
        made[step.id] = _made_by(step)


def _made_by(step: Step) -> str:
    if step.quantize:
        return "full" if step.quantize.method in CAST_METHODS else "quantized"
    return "sharded" if step.shard else "bench"


def _source_problems(recipe: Recipe):
    from llmkit.checkpoint.init import PRESETS

    if recipe.source.init is not None and recipe.source.init not in PRESETS:
        yield ("source", "init"), f"no preset {recipe.source.init!r}; choose {', '.join(PRESETS)}"


def references(step: Step) -> list[tuple[tuple, str]]:
    """(key path within the step's body, referenced step id) for every checkpoint it uses."""
    if step.quantize:
        return [(("from",), step.quantize.from_)]
    if step.shard:
        return [(("from",), step.shard.from_)]
    b = step.bench
    if b.quality:
        return [(("quality", "reference"), b.quality.reference)] + [
            (("quality", "candidates", i), c) for i, c in enumerate(b.quality.candidates)
        ]
    if b.compare:
        return [(("compare", "checkpoints", i), c) for i, c in enumerate(b.compare.checkpoints)]
    body = b.offline or b.serve
    drafts = [((b.kind, "speculative"), body.draft())] if body.draft() else []
    if b.offline:
        return [(("offline", "model"), b.offline.model), *drafts]
    return [(("serve", "model"), b.serve.model), *drafts] if b.serve.model else []


def _option_problems(step: Quantize, at: tuple):
    try:
        step.method_options()
    except ValidationError as e:
        first = e.errors()[0]
        if first["type"] == "extra_forbidden":
            takes = ", ".join(OPTION_MODELS[step.method].model_fields) or "no options"
            yield (*at, *first["loc"]), f"{step.method} takes no such option (it takes {takes})"
        else:
            yield (*at, *first["loc"]), first["msg"]
    except LlmkitError as e:
        yield at, str(e)


def _shard_problems(recipe: Recipe, step: Step, at: tuple):
    config = source_config(recipe)
    if config is None:
        return
    from llmkit.arch.plan import Model, check_tp

    try:
        check_tp(Model.from_config(config), step.shard.tp)
    except LlmkitError as e:
        yield (*at, "shard", "tp"), str(e)


def _assert_problems(step: Step, at: tuple):
    from llmkit.bench import asserts

    try:
        asserts.parse(step.bench.assert_)
    except LlmkitError as e:
        yield (*at, "bench", "assert"), str(e)


def source_config(recipe: Recipe) -> dict | None:
    """The source's config.json, when it is known without downloading anything."""
    s = recipe.source
    if s.init is not None:
        from llmkit.checkpoint.init import PRESETS, preset_config

        return preset_config(PRESETS[s.init], s.dtype) if s.init in PRESETS else None
    if s.path is not None and (Path(s.path) / "config.json").is_file():
        return json.loads((Path(s.path) / "config.json").read_text())
    return None
