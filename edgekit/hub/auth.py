"""Reviewer passwords (scrypt, per-user salt) and per-session CSRF tokens. Stdlib only.

Hash format: "scrypt$n$r$p$salt_hex$key_hex", so the cost can rise later without breaking old hashes.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1  # OWASP's minimum for scrypt (~16 MiB, ~40 ms here)
MAX_PASSWORD = 1024


def hash_password(password: str) -> str:
    if not password:
        raise ValueError("password must not be empty")
    salt = secrets.token_bytes(16)
    key = hashlib.scrypt(password.encode()[:MAX_PASSWORD], salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P,
                         dklen=32)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${salt.hex()}${key.hex()}"


# Checked against when the user does not exist, so a wrong name costs as much time as a wrong password.
_DUMMY = hash_password("edgekit-no-such-user")


def verify_password(password: str, stored: str | None) -> bool:
    """Constant-time check; False for unknown users (stored None) or malformed hashes."""
    try:
        scheme, n, r, p, salt, key = (stored or _DUMMY).split("$")
        if scheme != "scrypt":
            return False
        got = hashlib.scrypt(password.encode()[:MAX_PASSWORD], salt=bytes.fromhex(salt), n=int(n), r=int(r),
                             p=int(p), dklen=len(key) // 2)
    except ValueError:
        return False
    return hmac.compare_digest(got.hex(), key) and stored is not None


def new_csrf_token() -> str:
    return secrets.token_urlsafe(24)


def csrf_ok(session_token: str | None, sent: str | None) -> bool:
    return bool(session_token) and bool(sent) and hmac.compare_digest(str(session_token), str(sent))
