"""benchmarks/report.py renders result rows into BENCHMARKS.md's tables: the latest run of each
configuration, numbers as stored, and a written file that is whole or absent."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("benchmarks_report", ROOT / "benchmarks" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_rows(folder: Path, name: str, rows: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / f"{name}.jsonl").open("a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def recon_row(model: str, passes: float, frontier: float, **extra) -> dict:
    return {"model": model, "data": "mnist", "task": "0-2", "images": 2000, "layers": 5, "threads": 2, "torch": "x",
            "passes_s": passes, "frontier_s": frontier, "identical": True, "speedup": round(passes / frontier, 2), **extra}


def test_latest_run_of_each_configuration_wins_in_first_seen_order(report):
    rows = [{"model": "a", "v": 1}, {"model": "b", "v": 2}, {"model": "a", "v": 3}]
    assert report.latest(rows, report.fields("model")) == [{"model": "a", "v": 3}, {"model": "b", "v": 2}]


def test_num_never_rounds_what_the_row_stores(report):
    assert report.num(99.9) == "99.90"
    assert report.num(0.147) == "0.147"  # more decimals than asked for: printed in full
    assert report.num(None) == "-"
    assert report.num(3) == "3.00"


def test_recon_table_from_rows_in_tmp_path(report, tmp_path):
    # An earlier run, then a later run of the same configuration, and one other model.
    write_rows(tmp_path, "recon_speed", [
        recon_row("lenet5", 0.85, 0.31),
        recon_row("vgg16_bn", 16.11, 4.37, checkpoints_s=5.48, checkpoint_speedup=2.94,
                  **{"bn+refit+balance_s": 2.25, "recon+balance_s": 5.27}),
        recon_row("lenet5", 0.56, 0.28, checkpoints_s=0.3, checkpoint_speedup=1.87,
                  **{"bn+refit+balance_s": 0.16, "recon+balance_s": 0.36}),
    ])
    text = report.sec_recon(report.Results(tmp_path))
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert table == [
        "| model | layers | re-running per layer s | checkpoints s | speed-up | frontier s | speed-up | identical weights "
        "| bn+refit+balance s | recon+balance s |",
        "|---|---|---|---|---|---|---|---|---|---|",
        "| LeNet-5 | 5 | 0.56 | 0.30 | 1.87× | 0.28 | 2.00× | yes | 0.16 | 0.36 |",
        "| VGG-16-BN | 5 | 16.11 | 5.48 | 2.94× | 4.37 | 3.69× | yes | 2.25 | 5.27 |",
    ]
    assert "`python benchmarks/recon_speed.py`" in text
    # The prose's ranges come from the same rows: checkpoints / frontier is 0.30/0.28 and 5.48/4.37.
    assert "recon costs 1.1-1.3× what the frontier costs" in text


def test_missing_file_renders_a_note_and_the_whole_report_renders(report, tmp_path):
    assert "no rows in `benchmarks/results/density_latency.jsonl`" in report.sec_density_latency(report.Results(tmp_path))
    text = report.render(tmp_path)  # every section, no rows at all
    assert text.startswith("# Benchmarks")
    for title in ("## 1. Source models", "## 2. Contribution profiling", "## 3. Disassembly", "## 4. Assembly"):
        assert title in text


def test_reflow_wraps_prose_and_keeps_tables(report):
    prose = " ".join(["word"] * 60)
    text = report.reflow(f"{prose}\n\n| a | b |\n|---|---|\n| {prose} | x |\n\n- {prose}")
    blocks = text.split("\n\n")
    assert all(len(line) <= 100 for line in blocks[0].splitlines())
    assert blocks[1].splitlines()[2] == f"| {prose} | x |"
    assert blocks[2].startswith("- word") and blocks[2].splitlines()[1].startswith("  word")


def test_write_is_atomic_and_check_sees_staleness(report, tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    results = tmp_path / "results"
    write_rows(results, "recon_speed", [recon_row("lenet5", 0.56, 0.28)])
    assert report.main(["--results", str(results), "--write", str(out)]) == 0
    assert out.read_text() == report.render(results)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left
    assert report.main(["--results", str(results), "--check", str(out)]) == 0
    write_rows(results, "recon_speed", [recon_row("lenet5", 0.6, 0.3)])
    assert report.main(["--results", str(results), "--check", str(out)]) == 1

