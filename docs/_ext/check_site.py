"""Check a built site for what ``mkdocs build --strict`` lets through but a reader sees.

Run after the build: ``python docs/_ext/check_site.py SITE_DIR`` (exit status 1 and one
line per problem if any). Each check is a mistake the site once shipped:

* a docstring's doctest rendered as nested blockquotes instead of code;
* a constructor signature or a base class that is not the public API (the structures'
  guard ``__init__(*args: object, **kwargs: object)``, ``SharedStructure``) or a private
  sentinel default (``_MISSING``);
* two pages with one title.
"""

from __future__ import annotations

import html
import re
import sys
from collections import defaultdict
from pathlib import Path

_PRIVATE = ["SharedStructure", "_MISSING", "*args: object"]


def problems(site: Path) -> list[str]:
    found: list[str] = []
    titles: dict[str, list[str]] = defaultdict(list)
    for page in sorted(site.rglob("index.html")):
        name = str(page.parent.relative_to(site)) if page.parent != site else "(home)"
        text = page.read_text(encoding="utf-8")
        m = re.search(r"<h1[^>]*>(.*?)</h1>", text, re.S)
        if m:
            titles[html.unescape(re.sub(r"<[^>]+>", "", m[1])).strip(" \n¶")].append(name)
        # Markdown reads each ">" of ">>>" as a blockquote level; the docs never nest
        # blockquotes on purpose.
        if re.search(r"<blockquote>\s*<blockquote>", text) or re.search(
            r"<p>\s*&gt;&gt;&gt;", text
        ):
            found.append(f"{name}: a doctest rendered as text, not code")
        plain = html.unescape(re.sub(r"<[^>]+>", "", text))
        # The design notes are about the internals, and name them on purpose.
        for word in _PRIVATE if name != "design" else []:
            if word in plain:
                found.append(f"{name}: shows {word!r}")
    for title, pages in titles.items():
        if len(pages) > 1:
            found.append(f"pages {', '.join(pages)} share the title {title!r}")
    return found


def main() -> int:
    site = Path(sys.argv[1] if len(sys.argv) > 1 else "site")
    if not (site / "index.html").is_file():
        print(f"{site}: no built site here (run mkdocs build first)")
        return 2
    found = problems(site)
    for line in found:
        print(line)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
