"""Commands that need an extra name it in one line when it is missing (issue 11). The real agent-only install
is tests/test_wheel.py's; here a missing package is simulated, so the check runs in every test session."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from edgekit import cli


@pytest.mark.parametrize("args, extra", [
    (["train", "skab", "--out", "run"], "train"), (["export", "run", "--out", "bundle"], "train"),
    (["eval", "ipol"], "train"), (["demo"], "train"), (["hub"], "hub"), (["hub", "adduser", "x"], "hub"),
    (["labels", "export", "--out", "labels.csv"], "hub"),
])
def test_missing_extra_is_one_line(args: list[str], extra: str, monkeypatch, tmp_path) -> None:
    monkeypatch.setitem(cli.EXTRA_PACKAGES, extra, ("edgekit_test_not_installed",))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli.main, args)
    assert result.exit_code == 2, result.output
    assert result.output == (f"error: edgekit {args[0]} needs the '{extra}' extra: pip install 'edgekit[{extra}]' "
                             "(not installed: edgekit_test_not_installed)\n")
    assert not list(tmp_path.iterdir())


def test_every_command_that_needs_an_extra_names_a_known_one() -> None:
    assert set(cli.COMMAND_EXTRAS.values()) <= set(cli.EXTRA_PACKAGES)
    assert set(cli.COMMAND_EXTRAS) <= set(cli.main.commands)
