"""Participants as pseudonyms (issue 13): the code an operator enters becomes `pseudonym(code, salt)` on the
device, and only that pseudonym leaves it. Standard library plus edgekit's contract (topics, errors, paths);
never logs a code.

Why a salted hash (HMAC-SHA256 keyed by a random salt), not a plain hash: participant codes are short and
guessable (a station's codes are a few letters and digits), so SHA-256 of the code alone is reversed by
hashing every possible code, by anyone who holds the hub's database or sees the messages. Keyed by 32
random bytes that never leave the station, the pseudonym says nothing about the code without the salt.
It does not protect against whoever holds the station itself: with the salt, the codes can be tried again.

Why a salt per device by default, not one per fleet: with one salt everywhere, one person screened at two
stations has one pseudonym across the fleet, so the hub can follow them from station to station, which a
screening answer does not need. Each station therefore makes its own salt the first time it needs one
(`device_salt()`, STATE_DIR/participant-salt, mode 0600). An operator who wants the same pseudonym fleet-wide
(follow-up screenings at several stations) copies one station's salt file to the others on purpose, or
passes the same `path` everywhere. Back the salt up: a station whose salt is lost gives its old
participants new pseudonyms, and their earlier trials can then be found on the hub only by the old ones.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import unicodedata
from pathlib import Path

from edgekit import topics
from edgekit.errors import ConfigError, DataError
from edgekit.paths import state_dir

log = logging.getLogger(__name__)

SALT_FILE = "participant-salt"
SALT_BYTES = 32  # HMAC-SHA256's block is 64 bytes; 32 random bytes are past any guessing
CODE_MAX = 32  # characters of a normalised code (a study id such as "ST3-2024-000123" has 13)


def normalise(code: str) -> str:
    """The code as the station compares it: Unicode NFKC, blanks and '-' removed, upper case, so that
    "ab 12-3", "AB123" and "ａｂ１２３" are one participant however the operator typed it. DataError when
    nothing is left or it is longer than CODE_MAX; the error never repeats the code."""
    if not isinstance(code, str):
        raise DataError(f"participant code must be text (got {type(code).__name__})")
    text = unicodedata.normalize("NFKC", code)
    text = "".join(ch for ch in text if not ch.isspace() and ch != "-").upper()
    if not text:
        raise DataError("participant code is empty", hint="enter the code on the participant's card")
    if len(text) > CODE_MAX:
        raise DataError(f"participant code has {len(text)} characters, more than {CODE_MAX}",
                        hint="enter the code on the participant's card, not a name or a note")
    return text


def pseudonym(code: str, salt: bytes) -> str:
    """"p-" and the first 16 hex digits of HMAC-SHA256(salt, normalised code): what the trial carries and
    the hub stores (topics.parse_pseudonym checks the format)."""
    if len(salt) < 16:
        raise ConfigError(f"the participant salt must be at least 16 bytes (got {len(salt)})",
                          where="privacy salt")
    digest = hmac.new(salt, normalise(code).encode("utf-8"), hashlib.sha256).hexdigest()
    return topics.PSEUDONYM_PREFIX + digest[:topics.PSEUDONYM_HEX]


def device_salt(path: Path | None = None, *, create: bool = True) -> bytes:
    """This station's salt, made the first time (STATE_DIR/participant-salt unless `path`): 32 random bytes
    as hex in a file of mode 0600. Two processes starting at once end with the same salt (the file appears
    whole, by a link, or not at all). A salt file others may read is narrowed to 0600, with a warning.
    With `create=False` a missing file is a ConfigError (looking a code up where its salt is not)."""
    path = Path(path) if path is not None else state_dir() / SALT_FILE
    if not path.exists():
        if not create:
            raise ConfigError("no participant salt here", where=str(path),
                              hint="run this on the station that screened the participant, or give its salt "
                                   "file; a new salt would give a new pseudonym")
        _create(path)
    try:
        text = path.read_text(encoding="ascii").strip()
        salt = bytes.fromhex(text)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"cannot read the participant salt ({type(exc).__name__})", where=str(path),
                          hint="the file holds 64 hex digits; restore it from a backup, or remove it to "
                               "make a new one (every participant then gets a new pseudonym)") from None
    if len(salt) < 16:
        raise ConfigError(f"the participant salt is {len(salt)} bytes, fewer than 16", where=str(path),
                          hint="restore the file from a backup")
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        try:
            path.chmod(0o600)
            log.warning("privacy.salt_mode_narrowed path=%s was=%o now=600", path, mode)
        except OSError as exc:
            log.warning("privacy.salt_mode_open path=%s mode=%o error=%s", path, mode, exc.strerror)
    return salt


def _create(path: Path) -> None:
    """Write a new salt to a private temporary file, then link it into place unless another process did
    first (FileExistsError: theirs stays)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(secrets.token_hex(SALT_BYTES) + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
            log.info("privacy.salt_created path=%s", path)
        except FileExistsError:
            pass
    finally:
        tmp.unlink(missing_ok=True)
