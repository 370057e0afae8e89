"""bench/_spy.py: reading py-spy's collapsed stacks (no process is sampled here)."""

from __future__ import annotations

from pathlib import Path

from bench._spy import by_library, compare, summarize

# Two stacks of the framework and one of the baseline, in py-spy's raw format: frames named
# `function (path:line)` from the root, `;`-separated, then the sample count.
FRAMEWORK = "\n".join(
    [
        "<module> (main.py:3);Runner.run (asyncio/runners.py:118);"
        "SqliteWriter._flush (orchestrator/store/sql/_sqlite.py:9);"
        "apply_op (orchestrator/store/sql/_sqlite_apply.py:5) 30",
        "<module> (main.py:3);Runner.run (asyncio/runners.py:118);"
        "UnaryUnaryCall._invoke (grpc/aio/_call.py:20) 50",
        "<module> (main.py:3);Runner.run (asyncio/runners.py:118) 20",
    ]
)
BASELINE = "\n".join(
    [
        "<module> (baseline_sync.py:1);UnaryUnaryCall._invoke (grpc/aio/_call.py:20) 40",
        "<module> (baseline_sync.py:1);Runner.run (asyncio/runners.py:118) 20",
    ]
)


def test_own_samples_are_grouped_by_library_and_by_the_project_s_subpackage() -> None:
    assert by_library(FRAMEWORK) == {"orchestrator/store": 30, "grpc": 50, "stdlib": 20}


def test_the_comparison_is_in_microseconds_per_unit_of_work_biggest_extra_first(
    tmp_path: Path,
) -> None:
    framework, baseline = tmp_path / "f.spy", tmp_path / "b.spy"
    framework.write_text(FRAMEWORK)
    baseline.write_text(BASELINE)
    # 200 samples a second: one sample is 5000 us; 100 units of work on each side.
    lines = compare(framework, baseline, (100.0, 100.0)).splitlines()
    rows = {line.split()[0]: [float(value) for value in line.split()[1:]] for line in lines[1:]}
    assert rows["orchestrator/store"] == [1500, 0, 1500]
    assert rows["grpc"] == [2500, 2000, 500]
    assert rows["stdlib"] == [1000, 1000, 0]
    assert rows["all"] == [5000, 3000, 2000]
    assert [line.split()[0] for line in lines[1:4]] == ["orchestrator/store", "grpc", "stdlib"]


def test_the_summary_counts_each_function_once_per_stack_inclusive_and_at_its_top_own() -> None:
    summary = summarize(FRAMEWORK)
    assert summary.startswith("100 samples of the thread holding the GIL")
    assert "100.0% Runner.run (asyncio/runners.py)" in summary
    assert " 30.0% apply_op (orchestrator/store/sql/_sqlite_apply.py)" in summary
    assert " 20.0% Runner.run (asyncio/runners.py)" in summary.split("own:")[1]
