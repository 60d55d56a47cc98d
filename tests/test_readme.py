"""The README's two commands are the ones CI and users run."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _bash_blocks(text):
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    blocks = _bash_blocks(readme[readme.index("## Two commands") :])
    run_command, test_command = blocks[0], blocks[1]
    assert run_command.endswith("snakemake --cores all") and "pytest" in test_command
    ci_lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert test_command in ci_lines


def test_readme_links_exist():
    readme = (REPO / "README.md").read_text()
    for target in re.findall(r"\]\(((?:docs|results|src|resources)/[^)#]+)\)", readme):
        assert (REPO / target).exists(), target


def test_readme_results_table_is_the_pipeline_summary():
    """The README's numbers are the committed run's numbers, not typed in by hand."""
    readme = (REPO / "README.md").read_text()
    block = readme.split("<!-- summary:start -->")[1].split("<!-- summary:end -->")[0].strip()
    summary = (REPO / "results" / "summary.md").read_text()
    assert block.splitlines()[0].startswith("| margin")
    assert block in summary
