"""One MQTT module (issue 11): the broker endpoint parsed from its URL, the account and TLS files
(`MqttSecurity`, the model the agent's [mqtt] and [source] sections and the hub's options share), and the one
function that builds a paho client from them for the transport, the hub and the MQTT source alike.

Passwords never reach a message or a log line (`redact_url`). Must not import onnxruntime or torch; paho is
imported only by `make_client()`, so config.py and source.py may import this module without loading it.
"""

from __future__ import annotations

import logging
import socket
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import unquote, urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationInfo, field_validator

from edgekit.errors import ConfigError

if TYPE_CHECKING:
    import paho.mqtt.client as paho

log = logging.getLogger(__name__)

DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}
REDACTED = "REDACTED"
URL_HINT = "use mqtt://[USER@]HOST[:PORT], or mqtts:// for TLS"
TLS_FIELDS = ("ca_file", "cert_file", "key_file")
FILE_FIELDS = ("password_file", *TLS_FIELDS)  # paths, relative to the config file that names them


def redact_url(url: str) -> str:
    """`url` with the password of its user info replaced by REDACTED (the user name stays: it says which
    account). Works on text that is not a valid URL too: everything between the scheme and the last '@'."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    userinfo, at, host = rest.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    return f"{scheme}{sep}{userinfo.split(':', 1)[0]}:{REDACTED}@{host}"


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A broker: host, port, TLS or not, and the account its URL carried (if any). str() is HOST:PORT."""

    host: str
    port: int
    tls: bool
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not self.host:
            raise ValueError("an MQTT endpoint needs a host")
        if not 1 <= self.port <= 65535:
            raise ValueError(f"port must be 1-65535 (got {self.port})")

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_url(url: str, where: str = "mqtt.url") -> Endpoint:
    """`mqtt://[user[:password]@]host[:port]` or `mqtts://...` -> Endpoint (user and password percent-decoded).

    `where` names the key or option the URL came from; a ConfigError shows the URL with its password redacted.
    """
    shown = f"{where} {redact_url(url)!r}"
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port
    except ValueError as exc:  # a port that is not a number or out of range, a broken [IPv6] literal
        # urlsplit's words quote the bad port, which may be a piece of a password with a '/' in it: not shown
        problem = "a bad port" if "port" in str(exc).lower() else "a bad host"
        raise ConfigError(f"invalid broker url ({problem})", where=shown,
                          hint=f"{URL_HINT}; a port is 1-65535, and a '/', '?' or '#' in a password is written "
                          "%2F, %3F, %23") from None
    if parts.scheme not in DEFAULT_PORTS:
        raise ConfigError(f"broker url must start with mqtt:// or mqtts:// (got scheme {parts.scheme!r})",
                          where=shown, hint=URL_HINT)
    if not host:
        raise ConfigError("broker url has no host", where=shown, hint=URL_HINT)
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError("broker url must end after the host and port (no path, query or fragment)",
                          where=shown, hint=URL_HINT)
    try:
        return Endpoint(host, DEFAULT_PORTS[parts.scheme] if port is None else port, parts.scheme == "mqtts",
                        unquote(parts.username) if parts.username else None,
                        unquote(parts.password) if parts.password is not None else None)
    except ValueError as exc:
        raise ConfigError(str(exc), where=shown, hint=URL_HINT) from None


def label(key: str, name: str) -> str:
    """The name a user gave a field under: `mqtt.ca_file` in a config section, `edgekit hub --ca-file` for a
    command's options (a `key` with a space is a command)."""
    return f"{key} --{name.replace('_', '-')}" if " " in key else f"{key}.{name}"


class MqttSecurity(BaseModel):
    """The broker account and the TLS files. Validation is pure: files are named here and read only when a
    client is built (`make_client`). The agent's [mqtt] and [source] models extend it, the hub builds it from its
    options."""

    # As config.Strict (which imports this module): unknown keys are errors, inf/nan are refused.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    username: str | None = Field(None, min_length=1, description="Broker account name, if the broker wants "
                                 "one (or in the url: mqtt://USER@HOST).")
    password: SecretStr | None = Field(None, min_length=1, description="Broker password; prefer password_file, "
                                       "which keeps it out of this file. Not with password_file.")
    password_file: Path | None = Field(None, description="File whose first line is the broker password, read "
                                       "when connecting (relative to this file). Not with password.")
    ca_file: Path | None = Field(None, description="PEM file with the CA that signed the broker's certificate "
                                 "(mqtts:// only); default: the system's CAs.")
    cert_file: Path | None = Field(None, description="PEM client certificate, for a broker that requires one "
                                   "(mqtts:// only); with key_file.")
    key_file: Path | None = Field(None, validate_default=True, description="PEM private key (unencrypted) of "
                                  "cert_file.")

    @field_validator("password_file")
    @classmethod
    def _one_password(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if value is not None and info.data.get("password") is not None:
            raise ValueError("give password or password_file, not both")
        return value

    @field_validator("key_file")
    @classmethod
    def _cert_with_key(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        if "cert_file" in info.data and (value is None) != (info.data["cert_file"] is None):
            raise ValueError("cert_file and key_file go together (a client certificate and its private key)")
        return value

    @property
    def configured(self) -> bool:
        """Any field set."""
        return any(getattr(self, name) is not None for name in MqttSecurity.model_fields)


def security_of(data: dict[str, Any]) -> MqttSecurity:
    """The security fields among a model's already validated values (a validator's `info.data`), unchecked."""
    return MqttSecurity.model_construct(**{k: v for k, v in data.items() if k in MqttSecurity.model_fields})


def check(endpoint: Endpoint, security: MqttSecurity, key: str = "mqtt") -> None:
    """The rules between the url and the security fields (pure: nothing is read). ConfigError names the key."""
    if endpoint.username is not None and security.username is not None:
        raise ConfigError("the user name is given twice, in the url and here", where=label(key, "username"),
                          hint="keep one of them")
    if endpoint.password is not None and (security.password is not None or security.password_file is not None):
        raise ConfigError("the password is given twice, in the url and here",
                          where=label(key, "password" if security.password is not None else "password_file"),
                          hint="keep one; a password file keeps it out of configs and process lists")
    has_password = (endpoint.password is not None or security.password is not None
                    or security.password_file is not None)
    if has_password and endpoint.username is None and security.username is None:
        raise ConfigError("a password needs a user name", where=label(key, "username"),
                          hint="set it, or put it in the url: mqtt://USER@HOST")
    if not endpoint.tls:
        for name in TLS_FIELDS:
            if getattr(security, name) is not None:
                raise ConfigError(f"a TLS file for a plain mqtt:// broker ({endpoint})", where=label(key, name),
                                  hint="use mqtts://HOST:PORT for TLS, or remove the file")


def read_password(security: MqttSecurity, key: str = "mqtt") -> str | None:
    """The password (from `password`, or the first line of `password_file`), or None."""
    if security.password is not None:
        return security.password.get_secret_value()
    path = security.password_file
    if path is None:
        return None
    where = f"{label(key, 'password_file')} {path}"
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(f"cannot read the password file ({exc.strerror or exc})", where=where,
                          hint="a file readable by this user whose first line is the broker password") from None
    except UnicodeDecodeError:
        raise ConfigError("the password file is not UTF-8 text", where=where) from None
    if not lines or not lines[0]:
        raise ConfigError("the password file's first line is empty (expected the broker password)", where=where)
    return lines[0]


def tls_context(security: MqttSecurity, key: str = "mqtt") -> ssl.SSLContext:
    """What paho's tls_set builds (TLS client, certificate and host name verified), with each file that will
    not load named in a ConfigError: the CA file (else the system's CAs), the client certificate and key."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname
    if security.cert_file is not None:
        for name in ("cert_file", "key_file"):
            _readable(getattr(security, name), key, name)
        try:
            context.load_cert_chain(str(security.cert_file), str(security.key_file))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load the client certificate and key ({_ssl_words(exc)})",
                              where=f"{label(key, 'cert_file')} {security.cert_file}, "
                                    f"{label(key, 'key_file')} {security.key_file}",
                              hint="PEM files: the certificate, and its private key unencrypted") from None
    if security.ca_file is None:
        context.load_default_certs()
        return context
    _readable(security.ca_file, key, "ca_file")
    try:
        context.load_verify_locations(cafile=str(security.ca_file))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the CA certificates ({_ssl_words(exc)})",
                          where=f"{label(key, 'ca_file')} {security.ca_file}",
                          hint="a PEM file with the CA that signed the broker's certificate") from None
    return context


def _readable(path: Path | None, key: str, name: str) -> None:
    try:
        with open(path, "rb"):  # type: ignore[arg-type]
            pass
    except OSError as exc:
        raise ConfigError(f"cannot read the file ({exc.strerror or exc})", where=f"{label(key, name)} {path}",
                          hint="a PEM file readable by this user") from None


def _ssl_words(exc: BaseException) -> str:
    return str(getattr(exc, "reason", None) or exc)


def make_client(endpoint: Endpoint, security: MqttSecurity | None = None, *, client_id: str,
           version: Literal["3.1.1", "5"] = "3.1.1", manual_ack: bool = False, key: str = "mqtt") -> paho.Client:
    """A paho client (callback API 2) for `endpoint`, not yet connected: the account (the url's, or
    username with password or the first line of password_file, read now), TLS for mqtts:// (CA file or the
    system's CAs, client certificate), TCP_NODELAY. `version` "5" for MQTT v5; `manual_ack` for a
    subscriber that acknowledges only what it stored (the hub). ConfigError names the key or file at fault."""
    import paho.mqtt.client as paho

    security = security or MqttSecurity()
    check(endpoint, security, key)
    username = endpoint.username if endpoint.username is not None else security.username
    password = endpoint.password if endpoint.password is not None else read_password(security, key)
    context = tls_context(security, key) if endpoint.tls else None
    mqttc = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id,
                        protocol=paho.MQTTv5 if version == "5" else paho.MQTTv311, manual_ack=manual_ack)
    if username is not None:
        mqttc.username_pw_set(username, password)
    if context is not None:
        mqttc.tls_set_context(context)
    mqttc.on_socket_open = _set_nodelay
    return mqttc


def _set_nodelay(client: Any, userdata: Any, sock: Any) -> None:
    """FIELD-NOTES: without TCP_NODELAY, QoS 0 latency tails reach 35-41 ms on loopback."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError) as exc:  # websockets or a proxy socket: not a plain TCP socket
        log.debug("mqtt.nodelay_unavailable error=%s", exc)
