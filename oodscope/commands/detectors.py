"""``oodscope detectors [--family F]``: list the registered detectors, one aligned line each."""

from __future__ import annotations

import argparse
import re
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    from ..detectors.registry import FAMILIES

    parser = subparsers.add_parser("detectors", help="list the registered detectors (name, family, needs, paper)")
    parser.add_argument("--family", choices=list(FAMILIES), help="only this family")
    parser.set_defaults(run=run)


def plain(text: str) -> str:
    """reST markup removed: ``code`` -> code, :role:`x` -> x, *emphasis* -> emphasis, whitespace collapsed."""
    text = re.sub(r":\w+:`~?([^`]*)`", r"\1", text)
    text = text.replace("``", "").replace("`", "")
    text = re.sub(r"(?<!\w)\*{1,2}([^*]+)\*{1,2}", r"\1", text)
    return " ".join(text.split())


def paper(cls: type) -> str:
    """The method's title line and its citation (the module docstring's first paragraph that names a year, up to it)."""
    doc = sys.modules[cls.__module__].__doc__ or cls.__doc__ or ""
    paragraphs = [plain(p) for p in doc.strip().split("\n\n") if p.strip()]
    title = paragraphs[0].rstrip(".") if paragraphs else ""
    for paragraph in paragraphs[1:3]:
        match = re.match(r".*?\b(19|20)\d\d\b\)?", paragraph)
        if match and len(match.group(0)) < 240:
            return f"{title}. {match.group(0).strip()}"
    return title


def rows(family: str | None = None) -> list[tuple[str, str, str, str]]:
    from ..detectors import available, get

    out = []
    for name in available(family=family):
        cls = get(name)
        needs = ",".join(sorted(n.value for n in cls.needs)) or "-"
        out.append((name, cls.family, needs, paper(cls)))
    return out


def run(args: argparse.Namespace) -> int:
    table = rows(args.family)
    widths = [max(len(header), *(len(row[i]) for row in table)) for i, header in enumerate(("name", "family", "needs"))]
    print(f"{'name':<{widths[0]}}  {'family':<{widths[1]}}  {'needs':<{widths[2]}}  paper")
    for name, family, needs, cited in table:
        print(f"{name:<{widths[0]}}  {family:<{widths[1]}}  {needs:<{widths[2]}}  {cited}")
    counts = {family: sum(row[1] == family for row in table) for family in dict.fromkeys(row[1] for row in table)}
    print(f"{len(table)} registered: " + ", ".join(f"{n} {family}" for family, n in counts.items()))
    return 0
