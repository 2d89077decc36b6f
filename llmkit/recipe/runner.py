"""Run a recipe: the source, then each step in order. A step whose inputs are unchanged
since it last completed (same definition, same input content hashes) is skipped; every step
is recorded in run.json as it ends, so a failure leaves earlier outputs and says where."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import xxhash

from llmkit import __version__
from llmkit.bench import asserts
from llmkit.errors import LlmkitError
from llmkit.recipe import steps as run_step
from llmkit.recipe.schema import Recipe, Step, references

STATE = ".llmkit-run-state.json"
PASSED, MISSED, FAILED = "passed", "threshold missed", "failed"


@dataclass(slots=True)
class StepRecord:
    id: str
    kind: str
    status: str = "not run"  # done | skipped (unchanged) | threshold missed | failed | not run
    seconds: float = 0.0
    inputs: list[str] = field(default_factory=list)
    output: str | None = None
    metrics: dict = field(default_factory=dict)
    missed: list[str] = field(default_factory=list)
    error: str | None = None


@dataclass(slots=True)
class RunReport:
    recipe: str
    name: str
    outputs: str
    status: str = PASSED
    seconds: float = 0.0
    failed_step: str | None = None
    steps: list[StepRecord] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def exit_code(self) -> int:
        return {PASSED: 0, MISSED: asserts.THRESHOLD_MISSED}.get(self.status, 1)


class Runner:
    def __init__(self, recipe: Recipe, recipe_path: Path, force: bool = False,
                 on_step: Callable[[StepRecord], None] | None = None):  # fmt: skip
        self.recipe, self.force, self.on_step = recipe, force, on_step
        self.out = Path(recipe.outputs)
        self.report = RunReport(str(recipe_path), recipe.name, str(self.out.absolute()))
        self.paths: dict[str, Path] = {}  # step id -> checkpoint directory
        self.keys: dict[str, str] = {}  # step id -> content key of what it made
        self.state: dict = {}

    def run(self) -> RunReport:
        start = time.perf_counter()
        self.out.mkdir(parents=True, exist_ok=True)
        state_file = self.out / STATE
        self.state = json.loads(state_file.read_text()) if state_file.is_file() else {}
        records = [StepRecord("source", "source")] + [
            StepRecord(s.id, s.kind) for s in self.recipe.steps
        ]
        self.report.steps = records
        for record, step in zip(records, [None, *self.recipe.steps], strict=True):
            try:
                self._run_one(record, step)
            except Exception as e:  # a failed step ends the run; earlier outputs stay
                record.status, record.error = FAILED, str(e) or type(e).__name__
                self.report.status, self.report.failed_step = FAILED, record.id
            self.report.seconds = time.perf_counter() - start
            self._save()
            if self.on_step is not None:
                self.on_step(record)
            if record.status == FAILED:
                break
            if record.status == MISSED:
                self.report.status = MISSED
        return self.report

    def _run_one(self, record: StepRecord, step: Step | None) -> None:
        key = self._key(step)
        record.inputs = [] if step is None else [ref for _, ref in references(step)]
        previous = self.state.get(record.id, {})
        start = time.perf_counter()
        if not self.force and previous.get("key") == key and self._still_there(previous):
            record.metrics, record.output = previous.get("metrics", {}), previous.get("output")
            record.missed = self._check(step, previous.get("labelled", []))
            record.status = MISSED if record.missed else "skipped (unchanged)"
        else:
            labelled = self._execute(record, step)
            record.missed = self._check(step, labelled)
            record.status = MISSED if record.missed else "done"
            self.state[record.id] = {"key": key, "output": record.output,
                                     "metrics": record.metrics, "labelled": labelled}  # fmt: skip
        record.seconds = time.perf_counter() - start
        self.keys[record.id] = key
        if record.output and (step is None or step.kind != "bench"):
            self.paths[record.id] = Path(record.output)

    def _execute(self, record: StepRecord, step: Step | None) -> list:
        if step is None:
            record.output = str(run_step.make_source(self.recipe.source, self.out / "source"))
            return []
        target = self.out / step.id
        if step.quantize:
            record.metrics = run_step.quantize(
                step.quantize, self.paths[step.quantize.from_], target
            )
        elif step.shard:
            record.metrics = run_step.shard(step.shard, self.paths[step.shard.from_], target)
        else:
            result, labelled = run_step.bench(step.bench, self.paths)
            target = self.out / f"{step.id}.json"
            _write_json(target, result)
            record.metrics = _headline(result)
            record.output = str(target.absolute())
            return labelled
        record.output = str(target.absolute())
        return []

    def _check(self, step: Step | None, labelled: list) -> list[str]:
        if step is None or step.bench is None:
            return []
        return asserts.misses(asserts.parse(step.bench.assert_), [tuple(x) for x in labelled])

    def _key(self, step: Step | None) -> str:
        """What the step's result depends on: its definition and its inputs' keys."""
        if step is None:
            source = self.recipe.source
            content = _directory_hash(Path(source.path)) if source.path else None
            parts = [source.model_dump(), content]
        else:
            parts = [step.definition(), [self.keys[ref] for _, ref in references(step)]]
            if step.bench is not None and step.bench.lora is not None:
                parts.append(_directory_hash(Path(step.bench.lora).expanduser()))
        blob = json.dumps([__version__, *parts], sort_keys=True, default=str)
        return xxhash.xxh3_128_hexdigest(blob.encode())

    @staticmethod
    def _still_there(previous: dict) -> bool:
        output = previous.get("output")
        return output is not None and Path(output).exists()

    def _save(self) -> None:
        _write_json(self.out / STATE, self.state)
        _write_json(self.out / "run.json", self.report.to_dict())


def _headline(result: dict) -> dict:
    """The numbers a summary line shows (all of them are in the step's JSON)."""
    keys = ("completed", "failed", "output_throughput", "mean_ttft_ms", "p99_ttft_ms",
            "mean_tpot_ms", "load_s")  # fmt: skip
    return {k: result[k] for k in keys if k in result} | (
        {"rows": result["rows"]} if "rows" in result else {}
    )


def _directory_hash(path: Path) -> str:
    """Content hash of every file under a source directory (names and bytes)."""
    if not path.is_dir():
        raise LlmkitError(f"source path {path} is not a directory")
    digest = xxhash.xxh3_128()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode())
        with file.open("rb") as f:
            while chunk := f.read(16 * 2**20):
                digest.update(chunk)
    return digest.hexdigest()


def _write_json(path: Path, data) -> None:
    from llmkit.checkpoint.atomic import atomic_output_file

    with atomic_output_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
