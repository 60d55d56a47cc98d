"""Build dvc_plots.html: DVC's plot page with Vega, Vega-Lite and Vega-Embed inlined, so that the HTML
`dvc plots show` writes renders without a network (DVC's own page loads them from a CDN).

    cd "$(mktemp -d)" && npm pack vega@5.20.2 vega-lite@5.2.0 vega-embed@6.18.2
    for f in *.tgz; do mkdir "${f%.tgz}" && tar xzf "$f" -C "${f%.tgz}"; done
    python <repo>/resources/vega/build_template.py .

The versions are the ones dvc-render's VegaRenderer names. The page keeps DVC's `{plot_divs}` and
`{refresh_tag}` placeholders and drops `{scripts}` (the CDN tags).
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

LIBRARIES = ("vega-5.20.2/package/build/vega.min.js", "vega-lite-5.2.0/package/build/vega-lite.min.js",
             "vega-embed-6.18.2/package/build/vega-embed.min.js")
PLACEHOLDERS = ("{plot_divs}", "{refresh_tag}", "{scripts}")


def main(packs: Path) -> None:
    scripts = []
    for rel in LIBRARIES:
        code = (packs / rel).read_text(encoding="utf-8")
        if "</script" in code.lower() or any(p in code for p in PLACEHOLDERS):
            raise SystemExit(f"{rel}: cannot be inlined (holds '</script' or a DVC placeholder)")
        print(f"{Path(rel).name}  sha256 {hashlib.sha256(code.encode()).hexdigest()}")
        scripts.append(f"<script>/* {rel.split('/')[0]} (BSD-3-Clause, see LICENSES) */\n{code}\n</script>")
    page = "\n".join([
        "<!DOCTYPE html>",
        '<html>\n<head>\n<meta charset="utf-8">\n{refresh_tag}\n<title>negmargin: DVC plots</title>',
        *scripts,
        "<style>body { font-family: sans-serif; } table { border-spacing: 15px; }</style>",
        "</head>\n<body>\n{plot_divs}\n</body>\n</html>\n",
    ])
    Path(__file__).with_name("dvc_plots.html").write_text(page, encoding="utf-8")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
