"""A/B: one bench's figure at two revisions of the project, runs alternating in one invocation.

Each revision is checked out (``git worktree``, detached) into a temporary directory,
this checkout's bench/ is copied there (the same benches on both sides), and it
runs in each in turn, importing the project from there: A, B, A, B, for ``--pairs``
pairs, with this checkout's virtual environment. The figure is the bench's last
``key=value`` line (``--key`` picks another line of that form; ``--also`` adds more,
each summarized alike). Alternating cancels drift on a shared machine; the summary
gives both means, the mean of the per-pair differences and how many pairs agree on its
sign.

    .venv/bin/python bench/ab.py HEAD~1 HEAD -- bench/engine.py --runs 1
    .venv/bin/python bench/ab.py main WORKTREE --pairs 6 -- bench/engine.py --store memory

``WORKTREE`` stands for this checkout as it is, uncommitted changes included.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORKTREE = "WORKTREE"
_FIGURE = re.compile(r"^([A-Za-z_]+)=([-+0-9.eE]+)\s*$")


@contextlib.contextmanager
def checkout(revision: str) -> Iterator[Path]:
    """A directory holding the project at `revision` (this checkout for WORKTREE)."""
    if revision == WORKTREE:
        yield ROOT
        return
    with tempfile.TemporaryDirectory(prefix="ab-") as parent:
        path = Path(parent) / "tree"
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(path), revision],
            check=True,
        )
        try:
            yield path
        finally:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(path)], check=False
            )


def figure(output: str, key: str | None) -> tuple[str, float]:
    """The last `key=value` line of `output` (of `key`, when given)."""
    for line in reversed(output.splitlines()):
        match = _FIGURE.match(line.strip())
        if match and (key is None or match.group(1) == key):
            return match.group(1), float(match.group(2))
    raise SystemExit(f"no {key or 'key'}=value line in the bench's output:\n{output[-2000:]}")


def run(tree: Path, bench: Sequence[str]) -> str:
    """Run the bench in `tree` and return what it printed."""
    python = str(ROOT / ".venv" / "bin" / "python")
    script, *options = bench
    if tree != ROOT:  # the same benches on both sides: this checkout's
        shutil.copytree(ROOT / "bench", tree / "bench", dirs_exist_ok=True)
    done = subprocess.run(
        [python, str(tree / script), *options],
        check=False,
        cwd=tree,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise SystemExit(f"the bench failed in {tree}:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return done.stdout


def summary(name: str, a_name: str, a: list[float], b_name: str, b: list[float]) -> str:
    """Both sides' means and runs, and the mean of the pairs' differences with its agreement."""
    differences = [y - x for x, y in zip(a, b, strict=True)]
    mean = statistics.mean(differences)
    agree = sum(1 for d in differences if (d > 0) == (mean > 0) and d != 0)
    return (
        f"{a_name}: mean {statistics.mean(a):g} ({', '.join(f'{v:g}' for v in a)})\n"
        f"{b_name}: mean {statistics.mean(b):g} ({', '.join(f'{v:g}' for v in b)})\n"
        f"{name}: B-A mean {mean:+g} ({100 * mean / statistics.mean(a):+.1f}%),"
        f" {agree} of {len(differences)} pairs agree"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("a", help="the revision measured first in each pair (or WORKTREE)")
    parser.add_argument("b", help="the other revision (or WORKTREE)")
    parser.add_argument("--pairs", type=int, default=4, help="A+B pairs of runs")
    parser.add_argument("--key", help="the figure to compare (default: the bench's last)")
    parser.add_argument(
        "--also", action="append", default=[], metavar="KEY", help="another figure to compare"
    )
    parser.add_argument("bench", nargs="+", help="the bench script and its options, after --")
    args = parser.parse_args(argv)
    # figures[key][revision]: the first key is --key's, or the bench's last line's.
    figures: dict[str | None, dict[str, list[float]]] = {
        key: {args.a: [], args.b: []} for key in [args.key, *args.also]
    }
    names: dict[str | None, str] = {}
    with checkout(args.a) as tree_a, checkout(args.b) as tree_b:
        trees = {args.a: tree_a, args.b: tree_b}
        for pair in range(1, args.pairs + 1):
            for revision in (args.a, args.b):
                output = run(trees[revision], args.bench)
                shown = []
                for key, sides in figures.items():
                    names[key], value = figure(output, key)
                    sides[revision].append(value)
                    shown.append(f"{names[key]}={value:g}")
                print(f"pair {pair} {revision}: {' '.join(shown)}", flush=True)
    for key, sides in figures.items():
        print(summary(names[key], args.a, sides[args.a], args.b, sides[args.b]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
