"""Running the real Snakefile in a copy of the repository and reading what it prints and writes: shared by
the workflow, DVC, fault, Slurm and paper-profile tests."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
WORKFLOW_FILES = ["Snakefile", "workflow", "profiles", "config", ".test", "envs", "dvc.yaml", "data.dvc",
                  ".dvcignore"]


def job_env() -> dict[str, str]:
    """Jobs call `python -m negmargin`: put this interpreter's environment first on PATH."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def snakemake(*args: str, cwd: Path, timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", *args],
        cwd=cwd,
        env=job_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"snakemake {' '.join(args)} failed ({result.returncode}):\n"
            f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        )
    return result


def copy_workflow(dest: Path) -> Path:
    """The workflow files copied, resources/ copied (data is prepared from it), src/ linked (the code under
    test)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in WORKFLOW_FILES:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, dest / name)
        elif source.exists():
            shutil.copy2(source, dest / name)
    shutil.copytree(REPO / "resources", dest / "resources")
    (dest / "src").symlink_to(REPO / "src", target_is_directory=True)
    return dest


def merged_config(*files: Path) -> dict:
    """Config files merged as Snakemake merges them: mappings key by key, everything else replaced."""

    def merge(base: dict, over: dict) -> dict:
        out = dict(base)
        for key, value in over.items():
            out[key] = (
                merge(out[key], value)
                if isinstance(value, dict) and isinstance(out.get(key), dict)
                else value
            )
        return out

    config: dict = {}
    for path in files:
        config = merge(config, yaml.safe_load(path.read_text()))
    return config


def tool(name: str) -> str:
    """A command-line tool of this interpreter's environment (or on PATH); the test skips without it."""
    import pytest

    path = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (dvc belongs to the `workflow` extra)")
    return path


def job_counts(output: str) -> dict[str, int]:
    """The 'Job stats' table of a dry run: rule -> number of jobs."""
    match = re.search(r"Job stats:\n.*?\n-+\s+-+\n(.*?)\n\s*\n", output + "\n\n", re.S)
    assert match, f"no job stats in:\n{output[-3000:]}"
    counts = {}
    for line in match.group(1).splitlines():
        rule, count = line.split()
        counts[rule] = int(count)
    assert counts.pop("total") == sum(counts.values())
    return counts


def grid(config: dict) -> list[tuple[str, str, float, int]]:
    runs = []
    for dataset in config["run_datasets"]:
        cfg = config["datasets"][dataset]
        for arch in cfg["archs"]:
            margins = cfg["margins"][arch] if isinstance(cfg["margins"], dict) else cfg["margins"]
            seeds = cfg["seeds"][arch] if isinstance(cfg["seeds"], dict) else cfg["seeds"]
            runs += [(dataset, arch, float(m), int(s)) for m in margins for s in seeds]
    return runs


def expected_jobs(config: dict, mode: str = "shared") -> dict[str, int]:
    runs = grid(config)
    shots = config["metatest"]["shots"]
    ways = config["metatest"].get("ways", [5])
    picks = len(config["metatest"].get("checkpoints", ["best"]))
    pairs = {(d, a) for d, a, _, _ in runs}
    novel_features = 1 if mode == "shared" else len(shots)
    return {
        "prepare": len(config["run_datasets"]),
        "train": len(runs),
        "select": len(runs) * len(shots) * picks,
        "features": len(runs) * (novel_features + 1) * picks,  # + base_holdout of the analysed checkpoint
        "metatest": len(runs) * len(ways) * len(shots) * picks,
        "analyze": len(runs) * picks,
        "metrics": 1,
        "table": len(config["run_datasets"]),
        "plot_margins": len(pairs),
        "plot_tsne": len(pairs),
        "summary": 1,
        "all": 1,
    }


def read_markdown_tables(path: Path) -> list[list[dict[str, str]]]:
    """Every pipe table of a markdown file, as rows keyed by the header."""
    tables, lines = [], path.read_text().splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("|") and i + 1 < len(lines) and re.match(r"^\|[-| :]+\|$", lines[i + 1]):
            header = [c.strip() for c in lines[i].strip("|").split("|")]
            rows, i = [], i + 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(
                    dict(zip(header, (c.strip() for c in lines[i].strip("|").split("|")), strict=True))
                )
                i += 1
            tables.append(rows)
        else:
            i += 1
    return tables
