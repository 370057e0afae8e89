"""The framework's layout: no import cycles, no hand-written module past the size that asks
for a split.

The import graph is grimp's (the library under import-linter), built from the
source as it is: every `import` a module runs, in functions too, but not those
under `if TYPE_CHECKING:`, which never run.
"""

from __future__ import annotations

from pathlib import Path

import grimp

PACKAGE = "orchestrator"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE
MAX_LINES = 600
GENERATED = ("_pb2.py", "_pb2_grpc.py", "_pb2.pyi", "_pb2_grpc.pyi")


def import_cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Each set of modules that import each other, directly or not (Tarjan's strongly
    connected components of more than one module, or one importing itself)."""
    imports = {
        module: sorted(graph.find_modules_directly_imported_by(module)) for module in graph.modules
    }
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for imported in imports[module]:
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1 or module in imports[module]:
                cycles.append(sorted(component))

    for module in sorted(imports):
        if module not in index:
            visit(module)
    return cycles


def test_no_framework_module_imports_itself_back() -> None:
    graph = grimp.build_graph(PACKAGE, exclude_type_checking_imports=True, cache_dir=None)

    cycles = import_cycles(graph)

    loops = []
    for first, second, *_ in (cycle * 2 for cycle in cycles):
        there = graph.find_shortest_chain(importer=first, imported=second) or (first, second)
        back = graph.find_shortest_chain(importer=second, imported=first) or (second, first)
        loops.append(" -> ".join([*there, *back[1:]]))
    assert not cycles, "import cycles in the framework:\n" + "\n".join(loops)


def test_an_import_cycle_is_found_when_there_is_one() -> None:
    graph = grimp.ImportGraph()
    for module in ("p", "p.a", "p.b", "p.c"):
        graph.add_module(module)
    graph.add_import(importer="p.a", imported="p.b")
    graph.add_import(importer="p.b", imported="p.c")
    graph.add_import(importer="p.c", imported="p.a")

    assert import_cycles(graph) == [["p.a", "p.b", "p.c"]]

    graph.remove_import(importer="p.c", imported="p.a")
    assert import_cycles(graph) == []


def test_no_hand_written_framework_module_is_over_600_lines() -> None:
    sizes = {
        path.relative_to(ROOT.parent).as_posix(): len(path.read_text().splitlines())
        for path in ROOT.rglob("*.py")
        if not path.name.endswith(GENERATED)
    }

    assert len(sizes) > 50  # the framework's modules were found
    too_long = {name: lines for name, lines in sizes.items() if lines > MAX_LINES}
    assert not too_long, f"modules over {MAX_LINES} lines, to split: {too_long}"
