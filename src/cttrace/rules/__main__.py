"""``python -m cttrace.rules [--write README.md]``: print the rules table, or rewrite it in place.

The README's table lies between ``<!-- rules:start -->`` and ``<!-- rules:end -->``;
a unit test fails when it differs from what the rule modules declare.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cttrace.rules import readme_table

START, END = "<!-- rules:start -->\n", "<!-- rules:end -->\n"


def with_table(text: str) -> str:
    """``text`` with the part between the markers replaced by the current table."""
    head, found, rest = text.partition(START)
    _, found_end, tail = rest.partition(END)
    if not (found and found_end):
        raise ValueError(f"no {START.strip()} ... {END.strip()} markers")
    return f"{head}{START}{readme_table()}{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cttrace.rules", description=__doc__)
    parser.add_argument("--write", type=Path, metavar="README",
                        help="rewrite the table between the markers of this file")
    args = parser.parse_args(argv)
    if args.write is None:
        sys.stdout.write(readme_table())
        return 0
    try:
        args.write.write_text(with_table(args.write.read_text()))
    except (OSError, ValueError) as err:
        print(f"{args.write}: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
