"""Write docs/cli.md, the command-line reference, from the CLI's own argparse parser.

    python tools/cli_reference.py          # rewrite docs/cli.md
    python tools/cli_reference.py --check  # exit 1 when docs/cli.md differs from the parser (CI runs the test)

The reference is made from the parser's actions (flags, metavariables, defaults, choices, help), not from its
formatted help, so it does not depend on the terminal's width.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "docs" / "cli.md"


def _flags(action: argparse.Action) -> str:
    if not action.option_strings:
        return f"`{action.metavar or action.dest}`"
    names = ", ".join(f"`{s}`" for s in action.option_strings)
    if action.nargs == 0:
        return names
    meta = action.metavar or (action.dest.upper() if not action.choices else "{" + ",".join(map(str, action.choices)) + "}")
    return f"{names} `{meta}`"


def _row(action: argparse.Action) -> str:
    text = " ".join((action.help or "").split()).replace("|", "\\|")
    if text and action.default not in (None, False, argparse.SUPPRESS) and action.nargs != 0 and "default" not in text:
        text += f" (default: `{action.default}`)"
    return f"| {_flags(action)} | {text} |"


def reference() -> str:
    """The reference as Markdown."""
    from secateurs.cli import _parser

    parser = _parser()
    lines = ["# Command-line reference", "",
             "Generated from the parser by `python tools/cli_reference.py`; `tests/test_cli_reference.py` fails when",
             "this file and the parser differ.", "", f"`{parser.prog}`: {parser.description}", ""]
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {c.dest: c.help for c in sub._choices_actions}
    for name, command in sub.choices.items():
        lines += [f"## `{parser.prog} {name}`", "", helps.get(name) or "", "", "| argument | meaning |", "|---|---|"]
        lines += [_row(a) for a in command._actions if not isinstance(a, argparse._HelpAction)]
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    text = reference()
    if "--check" in sys.argv[1:]:
        if not OUT.is_file() or OUT.read_text(encoding="utf-8") != text:
            print(f"{OUT} is out of date: run python tools/cli_reference.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
