"""Run ``python main.py`` under cProfile: ``profile_orchestrator.py STATS_FILE [main.py args]``.

It serves like ``main.py`` (same ORCH_CONFIG, same graceful stop on SIGTERM),
then writes the cProfile stats of the event loop's thread to STATS_FILE and the
top functions by own time and by cumulative time to STATS_FILE.txt. Used by
``bench/sync_booking.py --profile FILE``.
"""

from __future__ import annotations

import cProfile
import io
import pstats
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: bench/ is on the path, the repo is not
    sys.path.insert(0, str(ROOT))

import main as booking_main  # noqa: E402

TOP = 45


def profile(stats_path: Path, argv: list[str]) -> int:
    """Serve under the profiler, then write the stats and their summary."""
    profiler = cProfile.Profile()
    profiler.enable()
    try:
        status = booking_main.main(argv)
    finally:
        profiler.disable()
        profiler.dump_stats(stats_path)
        summary = io.StringIO()
        stats = pstats.Stats(profiler, stream=summary).strip_dirs()
        stats.sort_stats(pstats.SortKey.TIME).print_stats(TOP)
        stats.sort_stats(pstats.SortKey.CUMULATIVE).print_stats(TOP)
        Path(f"{stats_path}.txt").write_text(summary.getvalue(), encoding="utf-8")
    return status


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(f"usage: {sys.argv[0]} STATS_FILE [main.py arguments]")
    sys.exit(profile(Path(sys.argv[1]), sys.argv[2:]))
