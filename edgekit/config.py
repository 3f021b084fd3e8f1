"""The agent's config tree and the one function that loads TOML into a validated model.

Validators are pure: no network, no files opened. Must not import onnxruntime, paho or torch.
"""

from __future__ import annotations

import codecs
import difflib
import sys
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from edgekit.errors import ConfigError
from edgekit.manifest import Recording
from edgekit.mqtt import FILE_FIELDS, MqttSecurity, check, label, parse_url, redact_url, security_of
from edgekit.paths import state_dir

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

M = TypeVar("M", bound=BaseModel)


def known_encoding(value: str) -> str:
    """A Python codec name that can decode a line (pure: codecs.lookup reads no files, the probe is in
    memory); ValueError names the bad one."""
    try:
        info = codecs.lookup(value)
    except (LookupError, ValueError):  # ValueError: a NUL in the name
        info = None
    if info is None or not getattr(info, "_is_text_encoding", True):  # base64, rot13: codecs, not encodings
        raise ValueError(f"unknown text encoding {value!r} (e.g. utf-8, latin-1, utf-16)")
    try:
        # a line in that encoding plus a stray byte, decoded as the readers do (errors replaced, not fatal):
        # 'undefined' refuses everything; idna and punycode refuse every error handler but 'strict'
        info.incrementaldecoder("replace").decode(info.encode("1.5,-2\r\n")[0] + b"\xff", final=True)
    except (UnicodeError, TypeError):
        raise ValueError(f"{value!r} cannot decode text lines (e.g. utf-8, latin-1, utf-16)") from None
    return value


class Strict(BaseModel):
    """Base for every config model: unknown keys are errors, values are not coerced silently."""

    # allow_inf_nan=False: inf passes `ge=0` and then crashes a wait (Event.wait(inf): OverflowError)
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# --- sources -------------------------------------------------------------------------------------


class ReplaySource(Strict):
    kind: Literal["replay"] = Field("replay", description="Replay a recorded file.")
    path: Path = Field(description="Recorded file: delimited text, one sample per line.")
    layout: Recording | None = Field(
        None, description="How the file holds samples (delimiter, header line, time column or rate, ...). "
        "Default: the layout of the bundle's training recordings (manifest input.recording)."
    )
    speed: float = Field(
        0.0, ge=0.0, description="1 = real time, N = N times faster, 0 = as fast as possible."
    )
    encoding: str = Field(
        "utf-8", description="Text encoding of the file (any Python codec name, e.g. latin-1, utf-16); a line "
        "that does not decode is quarantined, the rest of the file is read."
    )

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, value: str) -> str:
        return known_encoding(value)


def declared_channels(value: Any) -> Any:
    """A source's `channels`: None, a count > 0 or a list of distinct non-empty names (pure; ValueError
    says which rule is broken). Checked before pydantic's coercion, which would read true or "3" as a count."""
    if value is None:
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise ValueError(f"a count of channels must be >= 1 (got {value})")
        return value
    if isinstance(value, list) and value and all(isinstance(c, str) and c for c in value):
        dup = sorted({c for c in value if value.count(c) > 1})
        if dup:
            raise ValueError(f"channel names must be distinct ({dup} given twice)")
        return value
    raise ValueError(f"must be a count of channels or a list of channel names (got {value!r})")


CHANNELS_HELP = ("What each sample carries, in the order the device sends it: a count (the bundle's channels, in "
                 "the bundle's order) or a list of names (mapped to the bundle's channels by name; extra ones are "
                 "read and ignored). Default: the bundle's channels, in its order.")


class SerialSource(Strict):
    kind: Literal["serial"] = Field("serial", description="Read samples from a serial port.")
    port: str = Field(description="Serial device, e.g. /dev/ttyUSB0.")
    baudrate: int = Field(115200, gt=0, description="Line speed in baud.")
    channels: int | list[str] | None = Field(None, description=CHANNELS_HELP)
    rate_hz: float | None = Field(None, gt=0, description="Sample rate of the sensor, used to time-stamp lines "
                                  "without a time. Default: the bundle's (input.rate_hz); one that differs from "
                                  "the bundle's by more than edgekit.source.RATE_TOLERANCE stops the agent at start.")
    encoding: str = Field("utf-8", description="Text encoding of the lines (any Python codec name); a line "
                          "that does not decode is quarantined.")

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, value: str) -> str:
        return known_encoding(value)

    @field_validator("channels", mode="before")
    @classmethod
    def _channels(cls, value: Any) -> Any:
        return declared_channels(value)


def broker_url(value: str | None, info: ValidationInfo, key: str) -> str | None:
    """A url field's pure check: it parses, and agrees with the section's account and TLS fields."""
    if value in (None, ""):
        return None
    assert value is not None
    try:
        endpoint = parse_url(value, where=label(key, "url"))
    except ConfigError as exc:  # the url itself is shown, redacted, by format_validation_error
        raise ValueError(f"{exc.message} ({exc.hint})") from None
    try:
        check(endpoint, security_of(info.data), key)
    except ConfigError as exc:  # about another key: named in the message
        raise ValueError(str(exc)) from None
    return value


class MqttSource(Strict, MqttSecurity):
    """Its own broker (url, account, TLS files), or without a url the agent's [mqtt] broker and account."""

    kind: Literal["mqtt"] = Field("mqtt", description="Samples published by a sensor gateway.")
    topic: str = Field(description="Topic to subscribe to; payloads: one sample JSON {'t': seconds, 'values': "
                       "[...]}, a JSON block {'t0', 'rate_hz', 'channels', 'values': [[...], ...]} or a binary "
                       "block (edgekit/contract/samples.py; README 'Sensor payloads').")
    url: str | None = Field(None, validate_default=True, description="Broker as mqtt://[USER@]HOST[:PORT] or "
                            "mqtts://...; default: the agent's own broker (mqtt.url) with its account and TLS files.")
    channels: int | list[str] | None = Field(None, description=CHANNELS_HELP + " A JSON block that names its "
                                             "channels is mapped by its own names.")

    @field_validator("channels", mode="before")
    @classmethod
    def _channels(cls, value: Any) -> Any:
        return declared_channels(value)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value in (None, "") and security_of(info.data).configured:
            raise ValueError("the source's username, password, password_file, ca_file, cert_file and key_file "
                             "need its own url (without one it uses mqtt.url with the [mqtt] account and files)")
        return broker_url(value, info, "source")


class SimulatedSource(Strict):
    kind: Literal["simulated"] = Field("simulated", description="Synthetic signal for demos.")
    generator: Literal["gait", "pump"] = Field(description="'gait': TUG-like lower-back IMU; 'pump': a water pump with valve and rotor faults.")
    duration_s: float = Field(60.0, gt=0, description="Length of the simulated stream in seconds.")
    seed: int = Field(0, description="Random seed.")
    speed: float = Field(0.0, ge=0.0, description="1 = real time, 0 = as fast as possible.")


SourceConfig = Annotated[
    Union[ReplaySource, SerialSource, MqttSource, SimulatedSource], Field(discriminator="kind")
]


# --- the rest of the agent -----------------------------------------------------------------------


class MqttConfig(Strict, MqttSecurity):
    """The agent's broker: url, account and TLS files (MqttSecurity, shared with the mqtt source and the hub)."""

    url: str | None = Field(
        "mqtt://127.0.0.1:1883", description="Broker as mqtt://[USER@]HOST[:PORT] or mqtts://... (TLS); empty "
        "or null: outbox only."
    )
    keepalive_s: int = Field(30, ge=5, description="MQTT keepalive in seconds.")
    batch_interval_s: float = Field(
        0.0, ge=0.0, description="0: one message per result; >0: results batched per interval."
    )
    max_batch: int = Field(500, gt=0, description="Most results in one batched message.")
    max_inflight: int = Field(200, gt=0, description="Most unacknowledged QoS 1 messages at once.")
    reconnect_max_s: float = Field(10.0, gt=0, description="Longest wait between reconnect attempts.")

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None, info: ValidationInfo) -> str | None:
        return broker_url(value, info, "mqtt")


class OutboxConfig(Strict):
    path: Path = Field(default_factory=lambda: state_dir() / "outbox.db",
                       description="SQLite (WAL) file holding unsent results (default: STATE_DIR/outbox.db, "
                       "STATE_DIR being $EDGEKIT_STATE_DIR, else $XDG_STATE_HOME/edgekit or ~/.local/state/edgekit).")
    max_rows: int = Field(1_000_000, gt=0, description="Bound; beyond it the oldest are dropped and counted.")


class GateConfig(Strict):
    enabled: bool = Field(True, description="False: every window is accepted (no deferral).")
    downsample_points: int = Field(
        128, ge=8, description="Points per channel kept with a deferred window for the reviewer."
    )


class RuntimeConfig(Strict):
    profile: str = Field("auto", description="Device profile name from devices/profiles, or 'auto'.")
    intra_op_threads: int | None = Field(None, ge=1, description="Override the profile's thread count.")


class BaselineConfig(Strict):
    """A bundle that compares each machine with its own baseline (manifest input.baseline, edgekit/baseline.py)
    learns it from the device's first windows, keeps it in the outbox file, and learns it again on the command
    topic's `baseline` command; this section can give it one instead."""

    file: Path | None = Field(
        None, description="A baseline file (JSON, edgekit.baseline/1, edgekit.baseline.write_file) for this "
        "machine, e.g. learned on it before: used at start instead of learning from the first windows. Loaded "
        "again whenever the file changes; a baseline learned on command since the file was loaded is kept until "
        "then. Ignored by a bundle without a baseline.")


class RolloutConfig(Strict):
    """Model rollout (issue 16, edgekit/rollout.py): with a broker, the agent takes the hub's retained bundle
    command, fetches the bundle over HTTP(S), checks it (signature under public_key, input contract, on-device
    parity) and swaps it in while it runs, rolling back on failure."""

    enabled: bool = Field(True, description="false: ignore bundle commands; the agent runs the configured bundle.")
    store: Path | None = Field(None, description="Folder of the bundles a rollout unpacked, the `current` and "
                               "`previous` links and rollout.json (default: beside the outbox file, named after "
                               "it: outbox.db -> outbox.bundles). After a rollout the agent starts from its "
                               "`current` bundle, until the configured bundle itself changes.")
    ca_file: Path | None = Field(None, description="CA certificate (PEM) for an https:// hub (default: "
                                 "mqtt.ca_file, else the system's CAs).")
    timeout_s: float = Field(30.0, gt=0, description="Seconds an HTTP request for the bundle may stall.")
    max_bytes: int = Field(512 * 1024 * 1024, gt=0, description="Largest bundle accepted, archived and unpacked.")


MAX_TRIAL_LIMIT_S = 300.0  # agent.MAX_TRIAL_S: the longest trial kept in memory


class TrialConfig(Strict):
    """What a trial bundle (manifest input.extractor 'trial': a table of trial features) needs from the
    station: which of the source's channels are the lower-back IMU, and what the operator enters."""

    channels: list[str] = Field(
        min_length=6, max_length=6, description="The source's columns for acc x, y, z (m/s^2) and gyr x, y, z "
        "(rad/s), in that order (edgekit/gait.py reads them so).")
    rate_hz: float | None = Field(None, gt=0, description="Sample rate, when the source cannot tell it (serial, "
                                  "MQTT single samples); replay reads it from the file's layout.")
    operator: dict[str, float | str] = Field(
        default_factory=dict, description="What the operator enters for the participant, by registry name "
        "(edgekit/trial_features.py: age in years, sex F/M); only the fields the bundle's features name are used.")
    participant: str | None = Field(
        None, description="The participant's code when every trial of this run is one person's (a replayed "
        "recording); at a station the operator gives it with each start. Only its salted hash "
        "(edgekit/privacy.py) leaves the device, never the code.")
    detect: Literal["movement", "source"] = Field(
        "movement", description="Where a trial begins and ends when the operator has not started one: "
        "'movement' opens a trial when the trunk starts to move and closes it after 3 s of stillness "
        "(edgekit/trials.py); 'source' makes the whole source run one trial (a recorded trial replayed). "
        "The operator's start and stop (command topic, serial line START/STOP, station screen) always win.")
    max_s: float = Field(120.0, ge=10, le=MAX_TRIAL_LIMIT_S, description="A trial still running after this "
                         "many seconds is cut and reported as too long, not scored.")
    screen: str | None = Field(
        None, description="host:port of the station screen, a local page where the operator enters the "
        "participant code, starts and stops a trial and reads the answer (works offline). E.g. "
        "'127.0.0.1:8088'; null: no screen.")

    @field_validator("screen")
    @classmethod
    def _host_port(cls, value: str | None) -> str | None:
        if value is None:
            return None
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"must be host:port, e.g. '127.0.0.1:8088' (got {value!r})")
        return value


class PrometheusConfig(Strict):
    """The agent's own /metrics for Prometheus (edgekit/telemetry.py): off unless `port` is set."""

    port: int | None = Field(None, ge=0, le=65535, description="Serve http://HOST:PORT/metrics (windows, deferrals, "
                             "outbox depth, publish latency, ...); 0 picks a free port (logged). Needs the "
                             "prometheus_client package: pip install 'edgekit[metrics]'. Unset (default): off.")
    host: str = Field("127.0.0.1", min_length=1, description="Address to listen on; 0.0.0.0 for every "
                      "interface (the counts say nothing personal, but limit who can reach the port).")


class AgentConfig(Strict):
    device_id: str = Field("edge-1", min_length=1, description="This device's id, used in topics and result ids.")
    site: str = Field("default", min_length=1, description="Site name, used in topics.")
    bundle: Path = Field(description="Bundle directory written by `edgekit export`.")
    allow_unsigned: bool = Field(False, description="true: run the bundle without checking a signature (no "
                                 "public_key), for a bench or a lab; the agent's status says so (signature: "
                                 "\"unchecked\"). false (default): the agent refuses to start without public_key.")
    public_key: Path | None = Field(None, validate_default=True, description="Ed25519 public key (`edgekit keygen`): "
                                    "the bundle's manifest.sig must verify under it, or the agent does not start. "
                                    "Required unless allow_unsigned.")
    source: SourceConfig = Field(description="Where samples come from.")
    mqtt: MqttConfig = Field(default_factory=MqttConfig, description="Broker connection.")
    outbox: OutboxConfig = Field(default_factory=OutboxConfig, description="Disk outbox.")
    rollout: RolloutConfig = Field(default_factory=RolloutConfig, description="Model rollout from the hub.")
    gate: GateConfig = Field(default_factory=GateConfig, description="Human hand-off.")
    trial: TrialConfig | None = Field(None, description="For a trial bundle: the IMU channels, the operator's "
                                      "entries, how trials begin and end, and the station screen.")
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig, description="onnxruntime settings.")
    baseline: BaselineConfig = Field(default_factory=BaselineConfig, description="This machine's baseline, for a "
                                     "bundle that needs one (commissioning).")
    metrics_interval_s: float = Field(10.0, gt=0, description="How often metrics are published.")
    prometheus: PrometheusConfig = Field(default_factory=PrometheusConfig, description="The agent's own "
                                         "Prometheus endpoint, off by default.")

    @field_validator("device_id", "site")
    @classmethod
    def _topic_safe(cls, v: str) -> str:
        bad = set(v) & set("/+#$ ")
        if bad:
            raise ValueError(f"must not contain {''.join(sorted(bad))!r} (used in MQTT topics; got {v!r})")
        return v

    @field_validator("public_key")
    @classmethod
    def _signed_or_allowed(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        # Without a key, a bundle altered together with its manifest (new sha256s) would run unnoticed: running
        # one unchecked must be asked for by name (issue 16).
        allowed = info.data.get("allow_unsigned", False)
        if value is None and not allowed:
            raise ValueError("required: the agent runs only bundles whose signature it verifies; set it to the .pub "
                             "of `edgekit keygen` (edgekit run --public-key), or set allow_unsigned = true "
                             "(--allow-unsigned) to run a bundle unchecked")
        if value is not None and allowed:
            raise ValueError("allow_unsigned = true contradicts a public_key: keep the key (the bundle is checked) "
                             "or remove it (allow_unsigned runs the bundle unchecked)")
        return value


# --- loading -------------------------------------------------------------------------------------


def _members(annotation: Any) -> list[Any]:
    """The model classes inside an annotation (unwrapping Optional, Annotated and unions)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    out: list[Any] = []
    for arg in get_args(annotation):
        out.extend(_members(arg))
    return out


def _walk(model: type[BaseModel], loc: tuple[Any, ...]) -> tuple[list[str], list[str]]:
    """Follow a pydantic error location; return (shown key parts, allowed keys at its end).

    Tags of discriminated unions (e.g. `replay` in `source.replay.path`) are dropped from the shown key.
    """
    shown: list[str] = []
    current: list[Any] = [model]
    for part in loc[:-1]:
        tagged = [m for m in current if "kind" in m.model_fields and part == m.model_fields["kind"].default]
        if tagged:
            current = tagged
            continue
        shown.append(str(part))
        nxt: list[Any] = []
        for m in current:
            if part in m.model_fields:
                nxt.extend(_members(m.model_fields[part].annotation))
        current = nxt
    if loc:
        shown.append(str(loc[-1]))
    allowed = sorted({f for m in current for f in m.model_fields})
    return shown, allowed


SHOWN_CHARS = 200  # a bad value is quoted in an error up to this length


def format_validation_error(source: str, model: type[BaseModel], err: ValidationError) -> str:
    """One line per problem: `file: a.b: message (got X)` plus 'did you mean' for unknown keys."""
    lines = []
    for e in err.errors():
        shown, allowed = _walk(model, tuple(e["loc"]))
        key = ".".join(shown) or "(top level)"
        if e["type"] == "extra_forbidden":
            close = difflib.get_close_matches(shown[-1], allowed, n=1)
            msg = "unknown key"
            if close:
                msg += f", did you mean {close[0]!r}?"
            elif allowed:
                msg += f"; expected one of {', '.join(allowed)}"
        else:
            msg = e["msg"]
            if e["type"] != "missing" and "input" in e and shown[-1] != "password":  # never shown
                got = repr(redact_url(e["input"]) if shown[-1] == "url" and isinstance(e["input"], str)
                           else e["input"])
                msg += f" (got {got if len(got) <= SHOWN_CHARS else got[:SHOWN_CHARS] + '...'})"
        lines.append(f"{source}: {key}: {msg}")
    return "\n".join(lines)


def load_toml(path: Path | str) -> dict[str, Any]:
    """Read a TOML file, turning a missing file or a syntax error into ConfigError."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError("file not found", where=str(p), hint="expected a TOML file")
    try:
        with p.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}", where=str(p)) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"not UTF-8: byte 0x{exc.object[exc.start]:02x} at offset {exc.start}", where=str(p),
                          hint="TOML files are UTF-8 text") from None
    except RecursionError:  # tomllib recurses per nesting level: ~300 nested arrays exhaust the stack
        raise ConfigError("not valid TOML: nested too deeply", where=str(p)) from None
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror or exc}", where=str(p)) from None


def validate(model: type[M], data: dict[str, Any], source: str) -> M:
    """Validate a dict against a model; errors become one ConfigError naming file and key."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(source, model, err)) from None


def load_config(path: Path | str, model: type[M], overrides: dict[str, Any] | None = None) -> M:
    """The one place a TOML file becomes a config object. `overrides` are dotted keys from flags."""
    data = load_toml(path)
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    base = Path(path).parent
    cfg = validate(model, data, str(path))
    return _resolve_paths(cfg, base) if isinstance(cfg, AgentConfig) else cfg


def _resolve_paths(cfg: AgentConfig, base: Path) -> AgentConfig:
    """Relative paths in a config file are relative to that file, not to the working directory."""

    def fix(p: Path | None) -> Path | None:
        return p if p is None or p.is_absolute() else (base / p)

    def files(section: M) -> M:  # the password and TLS files of an [mqtt] or mqtt [source] section
        return section.model_copy(update={k: fix(getattr(section, k)) for k in FILE_FIELDS})

    source = cfg.source
    if isinstance(source, ReplaySource):
        source = source.model_copy(update={"path": fix(source.path)})
    elif isinstance(source, MqttSource):
        source = files(source)
    return cfg.model_copy(
        update={
            "bundle": fix(cfg.bundle),
            "public_key": fix(cfg.public_key),
            "source": source,
            "mqtt": files(cfg.mqtt),
            "outbox": cfg.outbox.model_copy(update={"path": fix(cfg.outbox.path)}),
            "rollout": cfg.rollout.model_copy(update={"store": fix(cfg.rollout.store), "ca_file": fix(cfg.rollout.ca_file)}),
            "baseline": cfg.baseline.model_copy(update={"file": fix(cfg.baseline.file)}),
        }
    )
