"""``oodscope detectors``: list the registered detectors, one line each."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("detectors", help="list the registered detectors")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..detectors import available, get

    for name in available():
        cls = get(name)
        summary = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        needs = ",".join(sorted(n.value for n in cls.needs)) or "-"
        print(f"{name:<16}{needs:<32}{summary}")
    return 0
