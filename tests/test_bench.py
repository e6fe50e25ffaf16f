"""The benchmark script runs (quick mode) and writes its JSON and markdown; timings are not asserted here."""

from __future__ import annotations

import json
import subprocess
import sys

from helpers import PROJECT_ROOT


def test_bench_quick_mode_writes_results(tmp_path):
    out = subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "bench" / "bench_patching.py"), "--quick", "--threads", "1", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert {r["sweep"] for r in results["sweeps"]} == {"resid_pre", "head_out"}
    assert all(isinstance(r["max_abs_diff"], float) for r in results["sweeps"])  # agreement itself: test_patching, test_families
    assert all(r["minimal_gflop"] > 0 and r["ours_gflops"] > 0 and r["matmul_gflops"] > 0 for r in results["sweeps"])
    assert results["attribution"][0]["forward_equivalents"] > 0
    assert "| toy-ioi | head_out |" in (tmp_path / "results.md").read_text() and "of the limit" in (tmp_path / "results.md").read_text()
