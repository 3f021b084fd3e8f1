"""Every `edgekit hub` and `edgekit labels` command given a database URL it cannot use prints one error line
naming the URL (password redacted) and exits 2, never a SQLAlchemy traceback (issue 16, acceptance 5)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click
import pytest

from edgekit.cli import main

pytest.importorskip("sqlalchemy", reason="the hub extra")

SECRET = "s3cret-pw"
# How each command is invoked with a database URL (URL stands for it; OUT for a file to write).
COMMANDS = {
    "hub": ["hub", "--db", "URL", "--http", "", "--broker", "mqtt://127.0.0.1:1"],
    "hub adduser": ["hub", "--db", "URL", "adduser", "alice", "--password", "long-enough"],
    "hub participant export": ["hub", "participant", "export", "p" * 16, "--db", "URL", "--out", "OUT"],
    "hub participant delete": ["hub", "participant", "delete", "p" * 16, "--db", "URL"],
    "hub participant delete --yes": ["hub", "participant", "delete", "p" * 16, "--db", "URL", "--yes"],
    "labels export": ["labels", "export", "--db", "URL", "--out", "OUT"],
    "deploy": ["deploy", "OUT", "--site", "plant", "--url", "http://127.0.0.1:1", "--db", "URL", "--broker",
               "mqtt://127.0.0.1:1"],
}
NO_DATABASE = {"hub add-device"}  # writes the broker's password file and ACL, opens no database


def _leaves(group: click.Group, prefix: str) -> set[str]:
    found = {prefix}
    for name, cmd in group.commands.items():
        found |= _leaves(cmd, f"{prefix} {name}") if isinstance(cmd, click.Group) else {f"{prefix} {name}"}
    return found


def test_every_hub_and_labels_command_is_tried() -> None:
    """A new hub or labels command joins COMMANDS (or NO_DATABASE), so it is tried with bad URLs too."""
    groups = {n: main.commands[n] for n in ("hub", "labels")}
    found = set().union(*(_leaves(g, n) for n, g in groups.items())) - {"labels", "hub participant"}
    found.add("deploy")  # edgekit deploy opens the hub's database too (issue 16)
    assert found == {c.split(" --")[0] for c in COMMANDS} | NO_DATABASE


@pytest.mark.parametrize("url, words", [
    (f"postgresql://hub:{SECRET}@127.0.0.1:1/edgekit", "cannot open the database: connection failed"),
    ("sqlite:////nonexistent-dir/hub.db", "cannot open the database: unable to open database file"),
    (f"postgresql://hub:{SECRET}@db:port/edgekit", "cannot parse the database URL"),
    (f"mysql://hub:{SECRET}@db/edgekit", "database URL must start with sqlite:/// or postgresql://"),
], ids=["unreachable", "no-such-folder", "bad-port", "other-database"])
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_bad_database_url_is_one_line_and_exit_2(command: str, url: str, words: str, tmp_path: Path) -> None:
    args = [url if a == "URL" else str(tmp_path / "out") if a == "OUT" else a for a in COMMANDS[command]]
    out = subprocess.run([sys.executable, "-m", "edgekit", *args], capture_output=True, text=True, timeout=60,
                         input="y\n")
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, (out.returncode, out.stderr[-3000:])
    assert lines[0].startswith("error: hub.db_url") and words in lines[0], lines[0]
    assert SECRET not in out.stderr + out.stdout and ("REDACTED" in lines[0] or SECRET not in url)
    assert not (tmp_path / "out").exists()
