"""A sampling profile of the framework while a bench measures it: py-spy, attached.

cProfile (``--profile``) instruments every call, which doubles this workload's
CPU and moves its hot spots; py-spy samples the running process from outside
(``--gil``: only the thread holding the GIL, the event loop's; ``--nonblocking``:
without stopping it), so the run it profiles is measured almost as it would be.
With ``--py-spy FILE`` the first framework run's measured window is recorded into
FILE (py-spy's ``raw`` format: collapsed stacks, one per line, what flamegraph.pl
and speedscope read) and its busiest functions summarized into FILE.txt.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import math
import re
import shutil
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
        print(f"  py-spy failed ({spy.returncode}): {errors.decode(errors='replace')[-500:]}")
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
