"""The package as a whole: no import circle in the application layer (src/fusedlinear), read
from the modules' imports; public PyTorch APIs only in every source file."""

import ast
import os
import pathlib
import re

import fusedlinear

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src", "fusedlinear")


def _module_name(filename: str) -> str:
    stem = filename[:-3]
    return "fusedlinear" if stem == "__init__" else f"fusedlinear.{stem}"


def import_graph(folder: str = SRC) -> dict[str, set[str]]:
    """{module: the modules of ``folder`` it imports}, for every ``folder/*.py`` of package fusedlinear."""
    modules = {_module_name(f): os.path.join(folder, f) for f in sorted(os.listdir(folder)) if f.endswith(".py")}
    graph = {}
    for name, path in modules.items():
        package = name if name == "fusedlinear" else name.rsplit(".", 1)[0]
        edges = set()
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from . import x, from .x import y
                    base = ".".join([package] + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            # `import fusedlinear.x.y` and `from .x import y` reach fusedlinear.x (and fusedlinear first)
            for target in targets:
                parts = target.split(".")
                edges |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & modules.keys()
        graph[name] = edges - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import circle of ``graph`` found by depth-first search, each as [a, b, ..., a]."""
    found, state = [], {}  # state: 1 on the current path, 2 done

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                found.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_the_cycle_finder_finds_a_circle_and_no_false_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_the_graph_sees_relative_absolute_and_function_local_imports(tmp_path):
    (tmp_path / "__init__.py").write_text("from .torch_ext import fuse\n")
    (tmp_path / "a.py").write_text("from . import b\nimport fusedlinear.c\n")
    (tmp_path / "b.py").write_text("def f():\n    from .a import g\n")
    (tmp_path / "c.py").write_text("from fusedlinear import __version__\n")
    graph = import_graph(str(tmp_path))
    assert graph == {"fusedlinear": set(), "fusedlinear.a": {"fusedlinear", "fusedlinear.b", "fusedlinear.c"},
                     "fusedlinear.b": {"fusedlinear", "fusedlinear.a"}, "fusedlinear.c": {"fusedlinear"}}
    assert cycles(graph) == [["fusedlinear.a", "fusedlinear.b", "fusedlinear.a"]]


def test_no_import_circle_in_the_application_layer():
    graph = import_graph()
    assert "fusedlinear.cli" in graph and "fusedlinear.bench" in graph["fusedlinear.cli"]  # it reads the real tree
    assert cycles(graph) == [], "import circles: " + "; ".join(" -> ".join(c) for c in cycles(graph))


PACKAGE = pathlib.Path(fusedlinear.__file__).resolve().parents[2]  # the repository root
PRIVATE = re.compile(r"torch\._C\b|_current_level|_functorch|_len_torch_dispatch_stack|_is_any_autocast_enabled"
                     r"|_are_functorch_transforms_active|_has_storage|_cuda_getCurrentRawStream|\.__func__"
                     r"|torch\._dynamo|torch\._library|_AutoDispatchBelowAutograd")


def test_sources_use_public_torch_api_only():
    """Private torch names break with the next release (torch 2.14 made Function.apply a builtin,
    which has no __func__): none in the package's code (comments aside)."""
    found = []
    for folder in ("torch_ext", "backend", "kernels", "src/fusedlinear"):
        for path in sorted((PACKAGE / folder).rglob("*.py")):
            for n, line in enumerate(path.read_text().splitlines(), 1):
                code = line.split("#", 1)[0]
                if PRIVATE.search(code):
                    found.append(f"{path.relative_to(PACKAGE)}:{n}: {line.strip()}")
    assert found == [], "\n".join(found)
