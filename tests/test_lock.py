"""The committed results are those of HEAD's code: `dvc status` finds every dependency and parameter of the
committed stages as `dvc.lock` recorded them.

A change to src/, workflow/, envs/, the Snakefile or a config without `dvc repro` (CONTRIBUTING.md, "When a
change moves the numbers") fails here. In the slow tier: while you edit code it fails by design, until the
results are refreshed.
"""

import json
import subprocess

import pytest
import yaml
from workflow_helpers import REPO, job_env, tool

pytestmark = pytest.mark.slow



def test_dvc_lock_matches_the_code_and_config_of_this_checkout():
    """Every stage in dvc.lock (the default's `workflow` always; `study` once its results are committed)."""
    stages = sorted(yaml.safe_load((REPO / "dvc.lock").read_text())["stages"])
    assert "workflow" in stages, f"dvc.lock lacks the default's stage: {stages}"
    result = subprocess.run([tool("dvc"), "status", "--json", *stages], cwd=REPO, env=job_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    status = json.loads(result.stdout or "{}")
    stale = {stage: change for stage, changes in status.items() for entry in changes if isinstance(entry, dict)
             for change in entry if change in ("changed deps", "changed params", "changed command")}
    assert not stale, (f"dvc status: {stale} since the committed results were made; refresh them "
                       f"(CONTRIBUTING.md) and commit results/ and dvc.lock with the change")
