"""Keeps benchmarks/compare_runbook.py working: one tiny run, end to end (no timings are asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = [
    "runbook: pg_dump | gzip", "runbook: gunzip -t", "runbook: gunzip -c | psql", "floor: pg_dump -Fd -j N",
    "floor: pg_dump > /dev/null", "regal backup (local)", "regal backup (S3, moto)", "regal verify (all checks)",
    "regal restore", "regal restore --validate rows",
]


def test_the_benchmark_runs_and_reports_every_step(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compare_runbook.py"), "--scales", "0.02",
                          "--json", str(out), "--work-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-3000:]

    (scale,) = json.loads(out.read_text())["scales"]
    steps = {s["name"]: s for s in scale["steps"]}
    assert list(steps) == STEPS
    assert all(s["seconds"] > 0 and s["peak_rss_mb"] > 0 for s in steps.values())
    assert steps["regal backup (local)"]["vs_floor"] > 0 and steps["regal restore"]["vs_runbook"] > 0
    assert 0 < steps["regal backup (local)"]["bytes_written"] < steps["floor: pg_dump -Fd -j N"]["bytes_written"]
    assert "| regal verify (all checks) |" in run.stdout  # the markdown table
    assert not list(tmp_path.glob("regal-bench-*"))  # its work directory is removed
