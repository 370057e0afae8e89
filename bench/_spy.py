"""A sampling profile of the framework while a bench measures it: py-spy, attached.

cProfile (``--profile``) instruments every call, which doubles this workload's
CPU and moves its hot spots; py-spy samples the running process from outside
(``--gil``: only the thread holding the GIL, the event loop's; ``--nonblocking``:
without stopping it), so the run it profiles is measured almost as it would be.
With ``--py-spy FILE`` the first framework run's measured window is recorded into
FILE (py-spy's ``raw`` format: collapsed stacks, one per line, what flamegraph.pl
and speedscope read) and its busiest functions summarized into FILE.txt; the first
baseline run's into FILE.baseline and FILE.baseline.txt, so the two can be compared
(`python bench/_spy.py FILE FILE.baseline`: samples per unit of work, by library).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import math
import re
import shutil
import signal
import sys
from pathlib import Path
from typing import Final

SAMPLES_PER_SECOND: Final = 200
TOP: Final = 40
"""Functions listed in the summary, by inclusive and by own samples."""
_FRAME = re.compile(r"(?P<name>.*) \((?P<path>.*?)(?::\d+)?\)$")
_LIBRARY = re.compile(r"^.*/(?:site-packages|python3\.\d+)/")
ROOT: Final = Path(__file__).resolve().parent.parent


def add_py_spy_option(parser: argparse.ArgumentParser) -> None:
    """`--py-spy FILE`."""
    parser.add_argument(
        "--py-spy",
        type=Path,
        metavar="FILE",
        help="sample the framework with py-spy during its first measured run: collapsed "
        "stacks in FILE, the busiest functions in FILE.txt (py-spy is in the bench extra)",
    )


def spy_output(path: Path, target: str) -> Path:
    """Where `target`'s profile goes: `path` for the framework, `path`.baseline for the
    baseline."""
    return path if target == "framework" else path.with_name(path.name + ".baseline")


def py_spy_binary() -> str:
    """The py-spy next to this interpreter, or on the PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    found = str(beside) if beside.exists() else shutil.which("py-spy")
    if found is None:
        raise SystemExit("--py-spy needs py-spy: pip install -e '.[bench]'")
    return found


async def record(pid: int, output: Path, *, delay: float, seconds: float) -> None:
    """After `delay` seconds (the warm-up), sample `pid` for `seconds` into `output`, then
    write the summary beside it."""
    await asyncio.sleep(delay)
    spy = await asyncio.create_subprocess_exec(
        py_spy_binary(),
        "record",
        "--gil",
        "--nonblocking",
        "--rate",
        str(SAMPLES_PER_SECOND),
        "--duration",
        str(max(1, math.floor(seconds))),
        "--pid",
        str(pid),
        "--format",
        "raw",
        "--output",
        str(output),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, errors = await spy.communicate()
    if spy.returncode != 0:
        # `--nonblocking` reads the process while it runs, and py-spy can die of what it
        # read half-changed (SIGSEGV): the profile is lost, the bench's figures are not.
        how = (
            f"killed by {signal.Signals(-spy.returncode).name}"
            if spy.returncode < 0
            else f"exit {spy.returncode}"
        )
        detail = errors.decode(errors="replace")[-500:]
        print(f"  py-spy failed on {output} ({how}): {detail}", flush=True)
        return
    print(f"  py-spy: {output} (summary: {write_summary(output)})", flush=True)


def write_summary(collapsed: Path) -> Path:
    """Summarize the stacks in `collapsed` into `<collapsed>.txt`; that file."""
    summary = collapsed.with_name(collapsed.name + ".txt")
    summary.write_text(summarize(collapsed.read_text()))
    return summary


def summarize(collapsed: str, top: int = TOP) -> str:
    """The functions with the most samples, inclusive (anywhere on the stack) and own (at
    its top), as shares of all samples; lines within a function are counted together."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        samples = int(count)
        total += samples
        frames = [_function(frame) for frame in stack.split(";")]
        own[frames[-1]] += samples
        for frame in set(frames):
            inclusive[frame] += samples
    lines = [f"{total} samples of the thread holding the GIL", "", "inclusive:"]
    lines += [f"{100 * n / total:5.1f}% {name}" for name, n in inclusive.most_common(top)]
    lines += ["", "own:"]
    lines += [f"{100 * n / total:5.1f}% {name}" for name, n in own.most_common(top)]
    return "\n".join(lines) + "\n"


def _function(frame: str) -> str:
    """`name (path:line)` as `name (path)`, the path relative to the repository or to
    the library's directory."""
    match = _FRAME.match(frame)
    if match is None:
        return frame
    path = match["path"].removeprefix(f"{ROOT}/")
    return f"{match['name']} ({_LIBRARY.sub('', path)})"


def by_library(collapsed: str) -> collections.Counter[str]:
    """Own samples by where the sampled frame's code lives: a library's top-level package
    (`aiormq`, `grpc`, ...), the standard library as `stdlib`, this repository's code by its
    top-level package and module (`orchestrator/facade`), anything else as it is named."""
    counts: collections.Counter[str] = collections.Counter()
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        counts[_library(stack.rsplit(";", 1)[-1])] += int(count)
    return counts


def _library(frame: str) -> str:
    match = _FRAME.match(frame)
    if match is None:
        return frame
    # py-spy names a file from its sys.path entry: `aiormq/channel.py`, `orchestrator/...`.
    parts = _LIBRARY.sub("", match["path"].removeprefix(f"{ROOT}/")).split("/")
    top = parts[0].removesuffix(".py")
    if top in sys.stdlib_module_names:
        return "stdlib"
    if top == "orchestrator" and len(parts) > 1:
        return f"{top}/{parts[1].removesuffix('.py')}"
    return top


def compare(framework: Path, baseline: Path, units: tuple[float, float]) -> str:
    """Microseconds of GIL-holding time per unit of work (a booking, a saga), by library,
    for the framework against the baseline: where the framework's extra CPU goes.
    `units` is how many each did while sampled (its rate times the run's length)."""
    sides = [by_library(framework.read_text()), by_library(baseline.read_text())]
    per_unit = [1e6 / SAMPLES_PER_SECOND / count for count in units]
    names = sorted(
        set(sides[0]) | set(sides[1]),
        key=lambda name: -(sides[0][name] * per_unit[0] - sides[1][name] * per_unit[1]),
    )
    lines = [f"{'us/unit':>30} {'framework':>10} {'baseline':>10} {'extra':>8}"]
    totals = [0.0, 0.0]
    for name in names:
        here, there = sides[0][name] * per_unit[0], sides[1][name] * per_unit[1]
        totals[0] += here
        totals[1] += there
        if max(here, there) >= 5:
            lines.append(f"{name[:30]:>30} {here:10.0f} {there:10.0f} {here - there:+8.0f}")
    lines.append(f"{'all':>30} {totals[0]:10.0f} {totals[1]:10.0f} {totals[0] - totals[1]:+8.0f}")
    return "\n".join(lines) + "\n"


def main() -> None:
    """`python bench/_spy.py FILE FILE.baseline --units N M`: the comparison."""
    parser = argparse.ArgumentParser(description=compare.__doc__)
    parser.add_argument("framework", type=Path)
    parser.add_argument("baseline", type=Path)
    parser.add_argument(
        "--units",
        type=float,
        nargs=2,
        required=True,
        metavar=("FRAMEWORK", "BASELINE"),
        help="how many bookings or sagas each did while sampled (rate x seconds)",
    )
    args = parser.parse_args()
    print(compare(args.framework, args.baseline, tuple(args.units)), end="")


if __name__ == "__main__":
    main()
