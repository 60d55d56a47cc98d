"""The package's import graph: no cycles, and the modules the Snakemake process reads need no numpy or torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "negmargin"
# Read by the Snakemake process before any job runs (workflow/rules/*.smk): standard library, PyYAML and
# jsonschema only.
LIGHT = ("negmargin.settings", "negmargin.options", "negmargin.datasets", "negmargin.pipeline.config",
         "negmargin.pipeline.plan", "negmargin.pipeline.docs", "negmargin.filestate")


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every negmargin module ``path`` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("negmargin"):
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("negmargin"))
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    return {
        name: {target for target in imports_of(path) if target in modules and target != name}
        - {"negmargin"}  # the package root only holds __version__
        for name, path in modules.items()
    }


def test_no_import_cycle():
    edges = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(edges[node]):
            if state.get(target) == 1:
                cycle = path[path.index(target):] + [target] if target in path else [node, target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if state.get(target) is None:
                visit(target, path + [target])
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])


def test_imports_flow_one_way():
    """cli -> commands -> (training, features, metatest, analysis, reporting) -> (models, data) ->
    (io, episodes, runtime, stats, options, settings): nothing lower imports anything higher."""
    edges = graph()
    floors = [("negmargin.__main__",), ("negmargin.cli",), ("negmargin.commands",),
              ("negmargin.training", "negmargin.features", "negmargin.metatest", "negmargin.analysis",
               "negmargin.reporting", "negmargin.pipeline"),
              ("negmargin.models", "negmargin.data", "negmargin.datasets"),
              ("negmargin.io", "negmargin.episodes", "negmargin.runtime", "negmargin.stats", "negmargin.options",
               "negmargin.settings", "negmargin.errors", "negmargin.filestate")]

    def floor(module: str) -> int:
        return next(i for i, names in enumerate(floors) if any(module == n or module.startswith(n + ".") for n in names))

    upward = [(a, b) for a, targets in edges.items() for b in targets if floor(b) < floor(a)]
    assert not upward, f"imports that go up a floor: {upward}"


def test_workflow_modules_import_neither_numpy_nor_torch():
    code = (
        "import sys\n"
        f"for name in {LIGHT!r}:\n"
        "    __import__(name)\n"
        "heavy = sorted(m for m in ('numpy', 'torch', 'torchvision', 'PIL') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={"PYTHONPATH": str(SRC)})
    assert result.stdout.strip() == "", f"the workflow's modules pulled in {result.stdout.strip()}"
