"""The README's ``nucseg predict`` options table agrees with the command's own defaults.

The defaults live in ``model/options.py`` and the CLI reads them from there; the README is the one
place they are written out for people, so this test keeps that copy true and complete.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from cli.main import build_parser

README = Path(__file__).resolve().parents[3] / "README.md"
# predict flags that are about the run itself, not about how the slide is segmented
NOT_IN_TABLE = {"--out", "--json", "--quiet", "--threads", "--help"}


def _predict_parser() -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["predict"]


def _table() -> dict[str, str]:
    """``{flag: default cell}`` from the table under 'Segment a slide locally'."""
    section = README.read_text().split("## Segment a slide locally", 1)[1]
    rows: dict[str, str] = {}
    for line in section.splitlines():
        if not line.startswith("| `--"):
            if rows:
                break
            continue
        option, default = (cell.strip() for cell in line.strip("|").split("|")[:2])
        flags = re.findall(r"`(--[a-z-]+)", option)
        defaults = [d.strip().strip("`") for d in default.split(" / ")]
        for flag, value in zip(flags, defaults if len(defaults) == len(flags) else [default] * len(flags),
                               strict=True):
            rows[flag] = value
    return rows


def test_every_predict_option_is_in_the_readme_table() -> None:
    flags = {f.split("=")[0] for a in _predict_parser()._actions for f in a.option_strings
             if f.startswith("--") and not f.startswith("--no-")}
    assert flags - NOT_IN_TABLE - set(_table()) == set()


def test_readme_defaults_are_the_commands_defaults() -> None:
    table = _table()
    checked = 0
    for action in _predict_parser()._actions:
        flag = next((f for f in action.option_strings if f in table), None)
        if flag is None or not isinstance(action.default, int | str) or isinstance(action.default, bool):
            continue  # prose defaults ("from the slide", "on for pyramids") are not literal values
        if flag == "--model":
            continue  # depends on NUCSEG_MODEL
        assert table[flag] == str(action.default), flag
        checked += 1
    assert checked >= 6
