"""docs/cli.md is generated from the CLI's parser and cannot drift from it."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _tool():
    spec = importlib.util.spec_from_file_location("cli_reference", ROOT / "tools" / "cli_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_cli_reference_is_the_parser():
    text = _tool().reference()
    assert (ROOT / "docs" / "cli.md").read_text(encoding="utf-8") == text, (
        "docs/cli.md is out of date: run python tools/cli_reference.py")
    for flag in ("--criterion", "--expert-layout", "--stream", "--recipe", "--onnx"):
        assert f"`{flag}`" in text


def test_every_subcommand_and_flag_is_listed():
    import argparse

    from secateurs.cli import _parser

    text = _tool().reference()
    sub = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, command in sub.choices.items():
        assert f"## `secateurs {name}`" in text
        for action in command._actions:
            for flag in action.option_strings:
                if flag not in ("-h", "--help"):
                    assert f"`{flag}`" in text, (name, flag)
