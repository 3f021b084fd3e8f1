"""Privacy (issue 13): participants are pseudonyms made on the station (edgekit/privacy.py), a name cannot
travel in a trial (tests/test_contract.py has the parser's side), the shipped ACL covers every topic the
station uses and no other device's, and the hub exports and deletes everything of one pseudonym and keeps
nothing past its retention, on SQLite and PostgreSQL, with no column that holds a name."""

from __future__ import annotations

import logging
import multiprocessing
import os
import stat
from pathlib import Path

import pytest

from edgekit import privacy, topics
from edgekit.errors import ConfigError, DataError

SALT = bytes(range(32))

# --- pseudonyms and the station's salt ---------------------------------------------------------------


def test_a_pseudonym_is_the_contracts_format_and_depends_on_the_code_and_the_salt_only() -> None:
    p = privacy.pseudonym("AB-123", SALT)
    assert topics.parse_pseudonym(p) == p and len(p) == topics.PSEUDONYM_LEN
    assert privacy.pseudonym("AB-123", SALT) == p
    assert privacy.pseudonym("AB-124", SALT) != p
    assert privacy.pseudonym("AB-123", bytes(32)) != p  # another station's salt: another pseudonym


@pytest.mark.parametrize("typed", ["AB-123", "ab123", " ab 12-3 ", "ＡＢ１２３", "Ab\t123\n"])
def test_the_code_is_normalised_so_the_way_it_was_typed_does_not_matter(typed: str) -> None:
    assert privacy.pseudonym(typed, SALT) == privacy.pseudonym("AB123", SALT)


@pytest.mark.parametrize("code", ["", "   ", "-", " - \t"])
def test_an_empty_code_is_a_clear_error(code: str) -> None:
    with pytest.raises(DataError, match="participant code is empty"):
        privacy.pseudonym(code, SALT)


def test_a_long_text_is_not_a_code_and_the_error_does_not_repeat_it() -> None:
    text = "Jane Doe, born 1941, lives at the corner of the market street"
    with pytest.raises(DataError, match="more than 32") as err:
        privacy.pseudonym(text, SALT)
    assert "Jane" not in str(err.value)
    with pytest.raises(ConfigError, match="at least 16 bytes"):
        privacy.pseudonym("AB-123", b"short")


def test_the_salt_is_made_once_per_station_private_and_the_code_is_never_logged(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("EDGEKIT_STATE_DIR", str(tmp_path / "state"))
    caplog.set_level(logging.DEBUG)
    salt = privacy.device_salt()
    path = tmp_path / "state" / privacy.SALT_FILE
    assert len(salt) == privacy.SALT_BYTES and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert privacy.device_salt() == salt  # loaded, not made again
    assert [p.name for p in path.parent.iterdir()] == [privacy.SALT_FILE]  # no temporary file left
    privacy.pseudonym("ZX-987", privacy.device_salt())
    assert "privacy.salt_created" in caplog.text and "ZX" not in caplog.text and "987" not in caplog.text
    other = privacy.device_salt(tmp_path / "other-station")
    assert other != salt  # a salt per station unless the operator copies one on purpose


def test_a_salt_file_others_may_read_is_narrowed_and_a_broken_one_is_a_clear_error(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "salt"
    salt = privacy.device_salt(path)
    path.chmod(0o644)  # e.g. copied from another station with cp
    assert privacy.device_salt(path) == salt and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert "privacy.salt_mode_narrowed" in caplog.text
    for text in ("not hex\n", "00ff\n"):
        path.write_text(text)
        with pytest.raises(ConfigError, match="participant salt") as err:
            privacy.device_salt(path)
        assert str(path) in str(err.value)


def _salt_in_child(path: str, queue: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    queue.put(privacy.device_salt(Path(path)).hex())


def test_two_processes_making_the_salt_at_once_end_with_the_same_one(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    path = tmp_path / "state" / privacy.SALT_FILE
    for _ in range(3):
        if path.exists():
            os.unlink(path)
        queue = ctx.Queue()
        procs = [ctx.Process(target=_salt_in_child, args=(str(path), queue)) for _ in range(4)]
        for proc in procs:
            proc.start()
        got = {queue.get(timeout=60) for _ in procs}
        for proc in procs:
            proc.join(60)
        assert len(got) == 1 and got == {path.read_text().strip()}
