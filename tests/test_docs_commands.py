"""Every `snakemake` command quoted in README.md, CONTRIBUTING.md and docs/*.md works as typed.

Each command (from a shell block, or an inline code span) runs in a copy of the repository, with its words
exactly as written and `--dry-run` put right after `snakemake` (so a target swallowed by `--configfile`
fails here as it would for a user); `--unlock` and `--lint` run as typed, and `--report` runs on the tiny
run's outputs. A local archive a command names as a source is created first, as a user would have put it
there. The profile's own effects (it is loaded; a failed job's log reaches the console) are in
tests/test_workflow.py.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from workflow_helpers import copy_workflow, job_env

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = [REPO / "README.md", REPO / "CONTRIBUTING.md", *sorted((REPO / "docs").glob("*.md"))]
PLACEHOLDERS = {"<rule>": "train"}  # what a reader puts in for the placeholders the docs use
AS_TYPED = ("--unlock", "--lint")  # commands that run no jobs: no dry run needed
LOCAL_SOURCE = re.compile(r'"source":\s*"(data/raw/[^"]+)"')


def _shell_commands(block: str) -> list[str]:
    """The commands of a shell block: continuation lines joined, quotes kept whole, comments dropped, and
    `a && b` as two commands."""
    commands, pending = [], ""
    for line in block.splitlines():
        pending = f"{pending}\n{line}" if pending else line
        if pending.rstrip().endswith("\\"):
            pending = pending.rstrip()[:-1] + " "
            continue
        try:
            words = shlex.split(pending, comments=True)
        except ValueError:  # a quote still open: the command goes on on the next line
            continue
        pending, current = "", []
        for word in [*words, "&&"]:
            if word in ("&&", "||", ";", "|"):
                if current:
                    commands.append(shlex.join(current))
                current = []
            else:
                current.append(word)
    return commands


def documented_commands() -> dict[str, str]:
    """``{command: where}`` for every `snakemake ...` in the documents (each command once)."""
    found: dict[str, str] = {}
    for document in DOCUMENTS:
        if not document.exists():
            continue
        text = document.read_text()
        blocks = re.findall(r"```(?:bash|sh|shell|console)\n(.*?)```", text, flags=re.S)
        candidates = [command for block in blocks for command in _shell_commands(block)]
        outside = re.sub(r"```.*?```", "", text, flags=re.S)
        candidates += [" ".join(span.split()) for span in re.findall(r"`([^`]*\bsnakemake [^`]*)`", outside)]
        for candidate in candidates:
            for part in re.split(r"\s(?:&&|\|\||;)\s", candidate):
                match = re.search(r"(?<![\w-])snakemake ", part)  # also `cmd: snakemake ...` of a dvc.yaml
                if match is None:
                    continue
                command = part[match.start():].strip()
                for placeholder, value in PLACEHOLDERS.items():
                    command = command.replace(placeholder, value)
                found.setdefault(command, document.name)
    return found


COMMANDS = documented_commands()


def test_the_documents_quote_the_commands_users_run():
    """The extraction finds the README's commands, in their fixed form: a guard for the test below."""
    assert "snakemake --cores all" in COMMANDS and "snakemake -n" in COMMANDS
    assert "snakemake --executor slurm --workflow-profile profiles/slurm --configfile=config/paper.yaml" in COMMANDS
    assert not [command for command in COMMANDS if "<" in command or "..." in command]
    assert not [command for command in COMMANDS if _swallowed_by_configfile(shlex.split(command))], (
        "write --configfile=FILE or put targets first: a target after `--configfile FILE` is read as a config file")


def _swallowed_by_configfile(words: list[str]) -> list[str]:
    """Words after a bare `--configfile` that are not config files (targets it would take for config files)."""
    if "--configfile" not in words:
        return []
    following = words[words.index("--configfile") + 1:]
    taken = following[:next((i for i, word in enumerate(following) if word.startswith("-")), len(following))]
    return [word for word in taken if not word.endswith((".yaml", ".yml", ".json"))]


def test_the_guard_catches_a_target_after_configfile():
    assert _swallowed_by_configfile(shlex.split("snakemake --configfile config/paper.yaml released")) == ["released"]
    assert not _swallowed_by_configfile(shlex.split("snakemake released --configfile config/paper.yaml x.yaml"))
    assert not _swallowed_by_configfile(shlex.split("snakemake --configfile=config/paper.yaml released"))


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    return copy_workflow(tmp_path_factory.mktemp("docs") / "repo")


def _run(words: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(words, cwd=cwd, env=job_env(), capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("command", sorted(c for c in COMMANDS if "--report" not in c),
                         ids=lambda c: f"{COMMANDS[c]}: {c[:80]}")
def test_a_documented_command_works_as_typed(command, clone):
    words = shlex.split(command)
    if "--use-conda" in words and shutil.which("conda") is None:
        pytest.skip("conda is not installed here (snakemake --use-conda needs it)")
    for source in LOCAL_SOURCE.findall(command):  # the archive the user has put there
        (clone / source).parent.mkdir(parents=True, exist_ok=True)
        (clone / source).touch()
    if not set(AS_TYPED) & set(words):
        words.insert(1, "--dry-run")
    result = _run(words, clone)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{command}\n{output[-4000:]}"
    if "--workflow-profile" not in words:
        assert "Using workflow specific profile profiles/default" in result.stderr
    if "--resources" in words and "gpu=4" in words:  # one GPU per train/features job, four at a time
        assert re.search(r"(?m)^\s+resources:.*\bgpu=1\b", result.stdout)


@pytest.mark.slow
@pytest.mark.parametrize("command", sorted(c for c in COMMANDS if "--report" in c and "config/study.yaml" not in c))
def test_a_documented_report_command_renders_the_tiny_run(command, e2e):
    """`--report` needs finished outputs: it runs on the tiny run's, with its config added. The study's report
    command is left out: its grid and folders (results/study/) are not the tiny run's, and no tiny study exists."""
    result = _run([*shlex.split(command), "--configfile=.test/config.yaml"], e2e)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (e2e / "results" / "report.html").stat().st_size > 100_000
