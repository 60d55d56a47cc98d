"""Shared fixtures: small prepared datasets built from the real embedded Omniglot archive."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OMNIGLOT = REPO / "resources" / "omniglot" / "omniglot_105.npz"
sys.path.insert(0, str(Path(__file__).parent))  # tests/reference_metatest.py and helpers


@pytest.fixture(scope="session")
def tiny_omniglot(tmp_path_factory) -> Path:
    """The real Omniglot pipeline on the first 12 characters of each Vinyals split (28x28, 4 held out)."""
    from negmargin.data.omniglot import prepare_omniglot
    from negmargin.datasets import OmniglotOptions
    from negmargin.options import SourceConfig

    out = tmp_path_factory.mktemp("data") / "omniglot"
    prepare_omniglot(out, SourceConfig(source=str(OMNIGLOT)),
                     OmniglotOptions(image_size=28, base_holdout=4, max_classes=12))
    return out


@pytest.fixture(scope="session")
def e2e(tmp_path_factory) -> Path:
    """The real Snakefile run end to end (`snakemake --cores 2`) on .test/config.yaml in a copy of the
    repository (a few minutes on 2 CPU cores), once per session: tests/test_workflow.py checks its outputs,
    tests/test_dvc.py compares `dvc repro` and tests/test_slurm.py the Slurm run with it. Tests must only
    read it (dry runs are fine)."""
    from workflow_helpers import copy_workflow, snakemake

    repo = copy_workflow(tmp_path_factory.mktemp("e2e") / "repo")
    snakemake("--cores", "2", "--configfile", ".test/config.yaml", cwd=repo, timeout=1200)
    return repo


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`): tiny models run
    fastest on one thread, and far faster than on two when other jobs share the cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
