"""The conda environments of the workflow (envs/*.yaml) against the rules and the package's imports.

* every rule names a conda env file that exists;
* each env lists every third-party package that the `negmargin` verbs its rules run import (followed
  through the package's own modules), at lower bounds that satisfy pyproject.toml's;
* the package itself reaches every env through PYTHONPATH (workflow/rules/common.smk), not pip.
"""

from __future__ import annotations

import argparse
import ast
import functools
import importlib.util
import inspect
import re
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli", reason="reading pyproject.toml needs tomllib (3.11+) or tomli")

REPO = Path(__file__).resolve().parents[1]
RULE_FILES = [REPO / "Snakefile", *sorted((REPO / "workflow" / "rules").glob("*.smk"))]

# import name -> names the package goes by (conda-forge names first, then PyPI's)
DISTRIBUTIONS = {
    "torch": ("pytorch", "pytorch-cpu", "pytorch-gpu", "torch"),
    "torchvision": ("torchvision",),
    "numpy": ("numpy",),
    "PIL": ("pillow",),
    "yaml": ("pyyaml",),
    "tqdm": ("tqdm",),
    "matplotlib": ("matplotlib-base", "matplotlib"),
    "seaborn": ("seaborn-base", "seaborn"),
    "sklearn": ("scikit-learn",),
    "scipy": ("scipy",),
}
CONDA_TO_PYPI = {
    "pytorch": "torch",
    "pytorch-cpu": "torch",
    "pytorch-gpu": "torch",
    "matplotlib-base": "matplotlib",
    "seaborn-base": "seaborn",
}


# ---------------------------------------------------------------------------------------------- rule files


def parse_rules() -> dict[str, dict[str, str | None]]:
    """rule name -> {'file', 'conda' (path as written), 'verb' (the negmargin verb its shell runs)}.

    The rule files are snakefmt-formatted, so a rule is the block from `rule NAME:` at column 0 to the next
    top-level statement."""
    rules: dict[str, dict[str, str | None]] = {}
    for path in RULE_FILES:
        blocks = re.split(r"(?m)^(?=\S)", path.read_text())
        for block in blocks:
            match = re.match(r"rule (\w+):", block)
            if not match:
                continue
            conda = re.search(r"(?m)^    conda:\s*\n\s+\"([^\"]+)\"", block)
            verb = re.search(r"python -m negmargin ([a-z-]+)", block)
            rules[match.group(1)] = {
                "file": str(path),
                "conda": conda.group(1) if conda else None,
                "verb": verb.group(1) if verb else None,
            }
    return rules


RULES = parse_rules()
COMMAND_RULES = {name: rule for name, rule in RULES.items() if rule["verb"]}


def env_path(rule: dict[str, str | None]) -> Path:
    """conda: paths are relative to the file that holds the rule."""
    return (Path(rule["file"]).parent / rule["conda"]).resolve()


def conda_requirement(spec: str) -> Requirement:
    """A conda match spec (`numpy>=1.24`, `conda-forge::numpy`, conda's fuzzy `numpy=1.24`) as a requirement."""
    spec = spec.split("::")[-1].strip()
    fuzzy = re.fullmatch(r"([A-Za-z0-9_.-]+)\s*=\s*([0-9][^=<>!~,\s]*)", spec)
    if fuzzy:  # conda's `=1.24` means 1.24.*
        return Requirement(f"{fuzzy.group(1)}=={fuzzy.group(2).rstrip('.*')}.*")
    return Requirement(spec.replace(" ", ""))


def load_env(path: Path) -> dict[str, Requirement]:
    """Dependencies of a conda env file (its pip section included), keyed by package name."""
    env = yaml.safe_load(path.read_text())
    specs: dict[str, Requirement] = {}
    for entry in env["dependencies"]:
        pip = isinstance(entry, dict)
        for spec in entry["pip"] if pip else [entry]:
            requirement = Requirement(spec) if pip else conda_requirement(spec)
            specs[requirement.name.lower()] = requirement
    return specs


def test_the_rule_parser_sees_every_rule():
    assert {
        "prepare",
        "train",
        "select",
        "features",
        "metatest",
        "analyze",
        "metrics",
        "table",
        "plot_margins",
        "plot_tsne",
        "summary",
        "all",
    } <= set(RULES)


TARGET_RULES = {"all", "released"}  # rules that only name the files a target needs: no job of their own


@pytest.mark.parametrize("name", sorted(set(RULES) - TARGET_RULES))
def test_every_rule_declares_an_existing_conda_env(name):
    rule = RULES[name]
    assert rule["conda"], f"rule {name} has no conda: directive"
    assert env_path(rule).is_file(), f"rule {name}: {rule['conda']} does not exist"


# ------------------------------------------------------------------------------------- imports per verb


def _module_file(module: str) -> Path | None:
    """The source file of a module, None if `module` is not one (e.g. a class imported by name)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    return Path(spec.origin) if spec and spec.origin and spec.origin.endswith(".py") else None


def _optional(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    """An import inside `try: ... except ImportError` is optional (the code has a fallback)."""
    while node in parents:
        parent = parents[node]
        if (
            isinstance(parent, ast.Try)
            and node in parent.body
            and any(
                isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError")
                for h in parent.handlers
            )
        ):
            return True
        node = parent
    return False


def _imports(tree: ast.AST, package: str) -> set[str]:
    """Absolute module names imported anywhere in `tree` (relative imports resolved against `package`)."""
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    names: set[str] = set()
    for node in ast.walk(tree):
        if _optional(node, parents):
            continue
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            names.add(base)
            # `from negmargin.data import omniglot` imports a module, not a name
            names |= {
                f"{base}.{alias.name}"
                for alias in node.names
                if base.startswith("negmargin") and _module_file(f"{base}.{alias.name}")
            }
    return names


def _module_level_imports(module: str) -> set[str]:
    path = _module_file(module)
    tree = ast.parse(path.read_text())
    top = ast.Module(
        body=[n for n in tree.body if not isinstance(n, (ast.FunctionDef, ast.ClassDef))], type_ignores=[]
    )
    return _imports(top, module.rpartition(".")[0] if not path.name == "__init__.py" else module)


def third_party_closure(seeds: set[str], stop: set[str]) -> set[str]:
    """Top-level third-party modules reached from `seeds`, following every import of negmargin modules
    except those in `stop` (the CLI command modules, whose other verbs import lazily)."""
    seen: set[str] = set(stop)
    third_party: set[str] = set()
    todo = list(seeds)
    while todo:
        name = todo.pop()
        top = name.split(".")[0]
        if top == "negmargin":
            for candidate in [name] + [name.rsplit(".", i)[0] for i in range(1, name.count(".") + 1)]:
                if candidate in seen or not _module_file(candidate):
                    continue
                seen.add(candidate)
                path = _module_file(candidate)
                package = candidate if path.name == "__init__.py" else candidate.rpartition(".")[0]
                todo += _imports(ast.parse(path.read_text()), package)
        elif top and top not in sys.stdlib_module_names and top != "__future__":
            third_party.add(top)
    return third_party


def unwrap(function) -> list:
    """A dispatch function, with a functools.partial opened up into its function and callable arguments; a
    registered dataset among the arguments adds its preparation function (imported by name when it runs)."""
    from negmargin.datasets import DatasetSpec

    if isinstance(function, functools.partial):
        parts = (function.func, *function.args, *function.keywords.values())
        return [f for part in parts if callable(part) for f in unwrap(part)] + [
            part.load_prepare() for part in parts if isinstance(part, DatasetSpec)]
    return [function]


def verb_functions() -> dict[str, list]:
    """negmargin verb -> the functions the CLI dispatches to (every sub-command of `prepare`)."""
    from negmargin.cli import build_parser

    def functions(parser: argparse.ArgumentParser) -> list:
        nested = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if nested:
            return [f for sub in nested[0].choices.values() for f in functions(sub)]
        return unwrap(parser.get_default("func"))

    top = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {verb: functions(parser) for verb, parser in top.choices.items()}


def verb_imports(functions: list) -> set[str]:
    """Third-party imports a verb needs: the CLI's module-level imports (every verb pays them), the body of
    its functions (the command modules import lazily) and their modules' top level, followed through
    negmargin."""
    seeds = _module_level_imports("negmargin.cli") | {"negmargin.cli"}
    from negmargin import cli

    seeds |= {node for node in _imports(ast.parse(inspect.getsource(cli.build_parser)), "negmargin")}
    for function in functions:
        module = function.__module__
        seeds |= _module_level_imports(module)
        seeds |= _imports(ast.parse(textwrap.dedent(inspect.getsource(function))), module.rpartition(".")[0])
    command_modules = {f.__module__ for fs in verb_functions().values() for f in fs}
    return third_party_closure(seeds, stop=command_modules)


VERBS = verb_functions()


def test_every_rule_runs_a_real_verb():
    for name, rule in COMMAND_RULES.items():
        assert rule["verb"] in VERBS, f"rule {name} runs `negmargin {rule['verb']}`, which does not exist"


@pytest.mark.parametrize("name", sorted(COMMAND_RULES))
def test_env_lists_every_import_of_the_rules_verb(name):
    rule = COMMAND_RULES[name]
    env = load_env(env_path(rule))
    needed = verb_imports(VERBS[rule["verb"]])
    assert needed, f"no imports found for `negmargin {rule['verb']}`: the scan is broken"
    unknown = needed - set(DISTRIBUTIONS)
    assert not unknown, f"add the distribution names of {sorted(unknown)} to DISTRIBUTIONS in this test"
    missing = {module for module in needed if not any(d in env for d in DISTRIBUTIONS[module])}
    assert not missing, (
        f"rule {name} runs `negmargin {rule['verb']}`, which imports {sorted(missing)}, "
        f"but {rule['conda']} does not list them"
    )


def test_the_scan_sees_lazy_imports():
    """Sanity check of the scan itself: training needs torch, the t-SNE plot needs scikit-learn."""
    assert {"torch", "numpy"} <= verb_imports(VERBS["train"])
    assert {"sklearn", "matplotlib"} <= verb_imports(VERBS["plot-tsne"])


# --------------------------------------------------------------------------------- versions vs pyproject


def pyproject_requirements() -> dict[str, Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    specs = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        specs += extra
    requirements = {}
    for spec in specs:
        requirement = Requirement(spec)
        if requirement.name != "negmargin":
            requirements[requirement.name.lower()] = requirement
    return requirements


def lower_bound(requirement: Requirement) -> Version | None:
    bounds = [
        Version(s.version.removesuffix(".*"))
        for s in requirement.specifier
        if s.operator in (">=", "==", "~=", ">")
    ]
    return max(bounds) if bounds else None


@pytest.mark.parametrize("env_file", sorted((REPO / "envs").glob("*.yaml")), ids=lambda p: p.name)
def test_env_versions_agree_with_pyproject(env_file):
    project = pyproject_requirements()
    for name, requirement in load_env(env_file).items():
        declared = project.get(CONDA_TO_PYPI.get(name, name))
        if declared is None:
            continue  # python, pip, ...: not a pyproject dependency
        env_bound, project_bound = lower_bound(requirement), lower_bound(declared)
        if project_bound is not None:
            assert env_bound is not None, (
                f"{env_file.name}: {name} needs a lower bound (pyproject: {declared})"
            )
            assert env_bound >= project_bound, (
                f"{env_file.name}: {name}{requirement.specifier} allows versions below pyproject's {declared}"
            )
        for spec in declared.specifier:
            if spec.operator in ("<", "<=", "!=", "=="):
                assert env_bound is None or spec.contains(env_bound), (
                    f"{env_file.name}: {name} lower bound {env_bound} is outside pyproject's {declared}"
                )


@pytest.mark.parametrize("env_file", sorted((REPO / "envs").glob("*.yaml")), ids=lambda p: p.name)
def test_env_requires_a_python_the_package_supports(env_file):
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    supported = Version(re.search(r">=\s*([\d.]+)", project["requires-python"]).group(1))
    python = load_env(env_file).get("python")
    assert python is not None and lower_bound(python) is not None and lower_bound(python) >= supported


# ------------------------------------------------------------------------------------ the package itself


def test_envs_reach_the_package_through_pythonpath():
    """The envs carry third-party packages only; rules run `python -m negmargin` with PYTHONPATH pointing at
    the checkout's src/. (A pip `-e ..` line would resolve against the copy of the env file that Snakemake
    keeps under .snakemake/conda/ or --conda-prefix, not against the repository.)"""
    common = (REPO / "workflow" / "rules" / "common.smk").read_text()
    assert 'Path(workflow.basedir, "src")' in common
    assert 'os.environ["PYTHONPATH"]' in common
    assert re.search(r"envvars:\s*\n\s+\"PYTHONPATH\"", common), "PYTHONPATH must be handed on with envvars"
    assert (REPO / "src" / "negmargin" / "__main__.py").is_file()
    for env_file in (REPO / "envs").glob("*.yaml"):
        assert "negmargin" not in load_env(env_file), f"{env_file.name}: the package comes from src/, not pip"
    shell_rules = {name for name, rule in RULES.items() if name not in TARGET_RULES}
    assert shell_rules == set(COMMAND_RULES), (
        f"rules {sorted(shell_rules - set(COMMAND_RULES))} do not call `python -m negmargin <verb>`"
    )
