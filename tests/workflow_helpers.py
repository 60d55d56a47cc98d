"""Running the real Snakefile in a copy of the repository, shared by the workflow, DVC and fault tests."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
WORKFLOW_FILES = ["Snakefile", "workflow", "config", ".test", "envs", "dvc.yaml", "data.dvc", ".dvcignore"]


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
