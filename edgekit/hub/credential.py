"""A broker account per device (issue 16): `edgekit hub add-device NAME --site S` adds the device's entry to
mosquitto's password file and its ACL block (edgekit/data/acl-device, the one copy of those lines), and writes
the password file the device keeps (mqtt.password_file in its agent.toml). Standard library only.

Why a password-file entry rather than a client certificate: the ACL already keys every device by its account
name (`user NAME`), and a password entry is that name with no further broker setting (a certificate needs
`use_identity_as_username` on the listener); revoking a device is deleting its line and a SIGHUP, where a
certificate needs a CRL the broker is told about; and the hub's host never holds a CA's private key. TLS
still protects the password on the wire and proves the broker to the device (mqtt.ca_file). A site that
wants certificates can still give agents cert_file/key_file (edgekit/mqtt.py); this command does not make them.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import re
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from edgekit.errors import ConfigError
from edgekit.paths import shipped

log = logging.getLogger(__name__)

ACL_DEVICE = shipped("data", "acl-device")
# mosquitto 2.0's own password hash ($7$: PBKDF2-HMAC-SHA512, 101 iterations, 12-byte salt, 64-byte digest),
# written when mosquitto_passwd is not installed (a hub container without the broker's tools).
PBKDF2_ITERATIONS = 101
PASSWORD_BYTES = 24  # secrets.token_urlsafe: 32 characters, 192 bits


@dataclass(frozen=True)
class DeviceAccount:
    """What add_device wrote: the device's own password file and the broker's two files."""

    device: str
    site: str
    device_password_file: Path
    broker_password_file: Path
    acl_file: Path
    acl_lines: int
    hashed_by: str  # "mosquitto_passwd" or "edgekit (mosquitto $7$)"


def acl_lines(*args: str) -> str:
    """What edgekit/data/acl-device prints for ARGS (`SITE DEVICE ...`, or `--hub`); its refusal (a bad name)
    becomes a ConfigError with its own words."""
    out = subprocess.run(["sh", str(ACL_DEVICE), *args], capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        words = (out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1]
        raise ConfigError(words.removeprefix("acl-device: "), where="add-device")
    return out.stdout


def mosquitto_hash(password: str, salt: bytes | None = None) -> str:
    """The `$7$` entry mosquitto_passwd (2.0) writes for `password`."""
    salt = salt if salt is not None else os.urandom(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, PBKDF2_ITERATIONS)
    return f"$7${PBKDF2_ITERATIONS}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def _accounts(passwd: Path) -> set[str]:
    if not passwd.exists():
        return set()
    return {line.split(":", 1)[0] for line in passwd.read_text().splitlines() if ":" in line}


def _acl_users(acl: Path) -> set[str]:
    if not acl.exists():
        return set()
    return {m.group(1) for m in re.finditer(r"^\s*user\s+(\S+)\s*$", acl.read_text(), re.MULTILINE)}


def _add_entry(passwd: Path, device: str, password: str, use_tool: bool) -> str:
    """Append the device's entry to the broker's password file (made 0640 when new: hashes are not for all)."""
    if not passwd.exists():
        passwd.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(passwd, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640))
    tool = shutil.which("mosquitto_passwd") if use_tool else None
    if tool:
        # the password on stdin (twice: it asks again), never on the command line where ps shows it
        out = subprocess.run([tool, str(passwd), device], input=f"{password}\n{password}\n", capture_output=True,
                             text=True, timeout=60)
        if out.returncode != 0:
            words = " ".join((out.stderr or out.stdout).split()) or f"exit {out.returncode}"
            raise ConfigError(f"mosquitto_passwd failed: {words}", where=str(passwd))
        return "mosquitto_passwd"
    text = passwd.read_text()
    with passwd.open("a") as fh:
        fh.write(("" if not text or text.endswith("\n") else "\n") + f"{device}:{mosquitto_hash(password)}\n")
    return "edgekit (mosquitto $7$)"


def add_device(device: str, site: str, *, passwd: Path, acl: Path, out_dir: Path,
               use_mosquitto_passwd: bool = True) -> DeviceAccount:
    """Make DEVICE's broker account at SITE: a new random password in OUT_DIR/DEVICE.pw (0600, for the device),
    its entry in `passwd` and its ACL block at the end of `acl` (a new ACL starts with the hub's block).
    Refuses a device that already has an account or ACL block, and writes nothing then."""
    passwd, acl, out_dir = Path(passwd), Path(acl), Path(out_dir)
    block = acl_lines(site, device)  # checks both names first
    if device in _accounts(passwd):
        raise ConfigError(f"device {device!r} already has an account", where=str(passwd),
                          hint="remove its line (and its ACL block) to issue a new password")
    if device in _acl_users(acl):
        raise ConfigError(f"device {device!r} already has an ACL block", where=str(acl),
                          hint="one site per device: remove the block first to move it")
    own = out_dir / f"{device}.pw"
    password = secrets.token_urlsafe(PASSWORD_BYTES)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(own, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ConfigError("the device's password file already exists; refusing to overwrite it", where=str(own),
                          hint="move it away (or choose another --out)") from None
    with os.fdopen(fd, "w") as fh:
        fh.write(password + "\n")
    try:
        hashed_by = _add_entry(passwd, device, password, use_mosquitto_passwd)
    except BaseException:
        own.unlink(missing_ok=True)
        raise
    head = "" if acl.exists() and acl.stat().st_size else acl_lines("--hub")
    with acl.open("a") as fh:
        fh.write(head + block)
    log.info("hub.device_added device=%s site=%s passwd=%s acl=%s hashed_by=%s", device, site, passwd, acl,
             hashed_by)
    return DeviceAccount(device, site, own, passwd, acl, len(block.strip().splitlines()), hashed_by)
