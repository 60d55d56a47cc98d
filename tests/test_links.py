"""Every relative link a reader can follow in the README, docs and committed results resolves in a fresh
clone: it names a file that git tracks (not a DVC-only checkpoint or run folder)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MARKDOWN_LINK = re.compile(r"\]\(([^)\s]+)\)")
HTML_LINK = re.compile(r"""(?:href|src)=["']([^"']+)["']""")


def tracked() -> set[str]:
    result = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip("not a git checkout")
    return set(result.stdout.splitlines())


def pages() -> list[Path]:
    files = tracked()
    return sorted(REPO / name for name in files
                  if name == "README.md" or name.startswith("docs/") and name.endswith(".md")
                  or name.startswith("results/") and name.endswith((".md", ".html")))


def relative_links(page: Path) -> list[str]:
    text = page.read_text(encoding="utf-8", errors="replace")
    pattern = HTML_LINK if page.suffix == ".html" else MARKDOWN_LINK
    links = []
    for target in pattern.findall(text):
        target = target.split("#")[0]
        if not target or re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("//"):
            continue  # anchors, URLs, data: and javascript: links
        links.append(target)
    return links


@pytest.mark.parametrize("page", pages(), ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_relative_link_resolves_to_a_committed_file(page):
    files = tracked()
    folders = {str(Path(name).parent) for name in files} | {
        str(parent) for name in files for parent in Path(name).parents}
    for target in relative_links(page):
        resolved = (page.parent / target).resolve()
        try:
            name = resolved.relative_to(REPO).as_posix()
        except ValueError:
            pytest.fail(f"{page.relative_to(REPO)}: link {target} leaves the repository")
        assert name in files or name in folders, f"{page.relative_to(REPO)}: link {target} is not a committed file"
