"""benchmarks/RESULTS.md is generated from the JSON results: the newest result of each
benchmark, one table each, and a line for a benchmark with none."""

from __future__ import annotations

import json

from tests.bench_helpers import BENCHMARKS, benchmark


def result(day: str, ratio: float, met: bool) -> dict:
    line = {
        "measured": "output tok/s",
        "llmkit": "10.0",
        "anchor": "5.0",
        "ratio": ratio,
        "target": "≥ 1.0×",
        "met": met,
    }
    return {
        "benchmark": "cpu_decode",
        "date": day,
        "commit": f"c{day[-2:]}",
        "machine": "m",
        "command": "python benchmarks/cpu_decode.py",
        "anchor": "llama.cpp",
        "summary": [line],
    }


def test_the_newest_result_of_each_benchmark_becomes_its_table(tmp_path):
    results_md = benchmark("results_md")
    (tmp_path / "cpu_decode-2026-01-02.json").write_text(json.dumps(result("2026-01-02", 2, True)))
    (tmp_path / "cpu_decode-2026-01-01.json").write_text(
        json.dumps(result("2026-01-01", 0.5, False))
    )
    (tmp_path / "soak-2026-01-03.json").write_text(json.dumps({"benchmark": "soak"}))  # no rows
    text = results_md.render(results_md.newest_results(tmp_path))
    section = text.split("(`benchmarks/cpu_decode.py`)")[1].split("\n## ")[0]
    assert "2026-01-02 · commit c02" in section and "cpu_decode-2026-01-02.json" in section
    assert "| output tok/s | 10.0 | 5.0 | 2.00× | ≥ 1.0×: met |" in section
    assert "c01" not in text
    soak = text.split("(`benchmarks/soak.py`)")[1].split("\n## ")[0]
    assert "No result recorded" in soak
    assert text.count("\n## ") == len(results_md.BENCHMARKS)


def test_a_missed_target_is_marked(tmp_path):
    results_md = benchmark("results_md")
    missed = result("2026-01-01", 0.5, False)["summary"][0]
    assert results_md.table_row(missed).endswith("| 0.50× | ≥ 1.0×: **missed** |")


def test_every_benchmark_script_is_listed():
    results_md = benchmark("results_md")
    scripts = {
        path.stem
        for path in BENCHMARKS.glob("*.py")
        if "save_result(" in path.read_text() and path.stem != "report"
    }
    assert scripts == set(results_md.BENCHMARKS)


def test_a_variant_gets_its_own_table_beside_the_plain_run(tmp_path):
    results_md = benchmark("results_md")
    plain, avx2 = result("2026-01-01", 2, True), result("2026-01-02", 0.5, False)
    avx2["variant"] = "AVX2 only"
    (tmp_path / "cpu_decode-2026-01-01.json").write_text(json.dumps(plain))
    (tmp_path / "cpu_decode-avx2-2026-01-02.json").write_text(json.dumps(avx2))
    text = results_md.render(results_md.newest_results(tmp_path))
    section = text.split("(`benchmarks/cpu_decode.py`)")[1].split("\n## ")[0]
    first, second = section.split("\n### AVX2 only\n")
    assert "commit c01" in first and "2.00×" in first
    assert "commit c02" in second and "**missed**" in second
