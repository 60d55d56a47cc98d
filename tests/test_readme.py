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
    """Every relative link of the README and of the files it sends users to (a moved file breaks it)."""
    for document in ("README.md", "CONTRIBUTING.md", "CHANGELOG.md"):
        text = (REPO / document).read_text()
        for target in re.findall(r"\]\(([^)#:\s]+)(?:#[^)]*)?\)", text):
            assert (REPO / target).exists(), (document, target)


COPY = re.compile(r"<!-- copy:(\S+) -->\n(.*?)\n<!-- /copy -->", re.S)


def test_readme_results_are_copies_of_the_pipeline_summaries():
    """The README's numbers and statements are the committed runs' own, not typed in by hand: every block
    between `<!-- copy:FILE -->` and `<!-- /copy -->` stands in FILE as it is."""
    readme = (REPO / "README.md").read_text()
    blocks = COPY.findall(readme)
    # every committed summary is quoted: the default's always, the study's once its results are committed
    summaries = {"results/summary.md"} | {name for name in ("results/study/summary.md",) if (REPO / name).is_file()}
    assert {source for source, _ in blocks} >= summaries
    for source, block in blocks:
        assert block.strip() and block in (REPO / source).read_text(), f"README block from {source} is stale"


def test_readme_cost_table_is_the_benchmarks():
    """The paper-profile cost table is bench/bench_paper_cells.py's output, not typed in by hand."""
    import json

    readme = (REPO / "README.md").read_text()
    block = readme.split("<!-- paper-cells:start -->")[1].split("<!-- paper-cells:end -->")[0].strip()
    bench = json.loads((REPO / "bench" / "results" / "paper_cells.json").read_text())
    assert block == bench["markdown"].strip()
    assert [(c["dataset"], c["arch"]) for c in bench["cells"]] == [
        (d, a) for d in ("cub", "mini_imagenet", "tiered_imagenet") for a in ("conv4", "resnet12")]


def test_citation_file_cites_the_paper_as_the_readme_does():
    """CITATION.cff's preferred citation is the README's BibTeX entry: same title, authors in order, year."""
    import yaml

    readme = (REPO / "README.md").read_text()
    bibtex = re.search(r"```bibtex\n(.*?)```", readme, flags=re.S).group(1)
    fields = dict(re.findall(r"(\w+)\s*=\s*\{(.*)\},?\n", bibtex))
    cited = yaml.safe_load((REPO / "CITATION.cff").read_text())
    assert cited["cff-version"] == "1.2.0" and cited["license"] == "MIT"
    paper = cited["preferred-citation"]
    assert paper["title"] == fields["title"] and str(paper["year"]) == fields["year"]
    assert [f"{a['family-names']}, {a['given-names']}" for a in paper["authors"]] == fields["author"].split(" and ")
