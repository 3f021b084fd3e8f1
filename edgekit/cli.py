"""The `edgekit` command line. The only place that configures logging, prints, and maps errors to exit codes.

Every command imports its stage lazily, so `edgekit run` never pulls in torch and `--help` is instant.
Exit codes: 0 ok, 1 unexpected error, 2 bad input (config, data, bundle, broker), 3 parity/export failed,
4 `run`'s source ended with results still queued for a broker that did not take them (see EXIT_QUEUED),
5 `deploy`'s rollout stopped (EXIT_ROLLOUT_STOPPED).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Callable

import click

from edgekit import __version__

log = logging.getLogger("edgekit.cli")

EXIT_CODES = {"ExportError": 3}
# Commands that need an extra, and the packages whose absence means the extra is not installed: checked before
# the command imports anything, so an agent-only install answers with one line instead of a traceback.
EXTRA_PACKAGES: dict[str, tuple[str, ...]] = {
    "train": ("torch", "sklearn", "onnx", "skl2onnx", "matplotlib", "tqdm", "scipy"),
    "hub": ("fastapi", "uvicorn", "sqlalchemy", "jinja2", "itsdangerous", "prometheus_client"),
}
COMMAND_EXTRAS = {"train": "train", "export": "train", "eval": "train", "demo": "train", "hub": "hub",
                  "labels": "hub", "deploy": "hub"}
# `edgekit run`: the source ended on its own and results stay in the outbox because the broker was unreachable
# (or the drain timed out). Nothing is lost (they go after the next start), but the run did not deliver: a
# script or CI job can tell this from 0. A stop asked for by SIGTERM/SIGINT exits 0 whatever stays queued
# (systemctl stop is not a failure), and so does a run without a broker (--broker '').
EXIT_QUEUED = 4


def _setup_logging(verbose: int, fmt: str = "text") -> None:
    from edgekit import logs

    logs.setup(max(logging.WARNING - 10 * verbose, logging.DEBUG), fmt)


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """EdgekitError -> one clear message and a non-zero exit; traceback only with --debug."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from edgekit.errors import EdgekitError

        ctx = click.get_current_context()
        debug = bool(ctx.find_root().params.get("debug"))
        try:
            return fn(*args, **kwargs)
        except EdgekitError as exc:
            if debug:
                raise
            click.echo(f"error: {exc}", err=True)
            sys.exit(EXIT_CODES.get(type(exc).__name__, 2))
        except KeyboardInterrupt:
            sys.exit(130)

    return wrapper


def require_extra(command: str) -> None:
    """EdgekitError naming the extra and its pip command when `edgekit COMMAND` needs one that is missing."""
    from edgekit.errors import EdgekitError

    extra = COMMAND_EXTRAS[command]
    missing = [name for name in EXTRA_PACKAGES[extra] if importlib.util.find_spec(name) is None]
    if missing:
        raise EdgekitError(f"edgekit {command} needs the '{extra}' extra: pip install 'edgekit[{extra}]'",
                           hint=f"not installed: {', '.join(missing)}")


def stop_on_signals() -> threading.Event:
    """SIGTERM/SIGINT set an event: stages stop reading, the agent drains while the broker takes rows (at once
    ends the drain while the broker is away: the outbox keeps them), says offline, exit 0."""
    stop = threading.Event()

    def _handler(signum: int, _frame: Any) -> None:
        log.warning("cli.signal signal=%s stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, _handler)
    signal.signal(signal.SIGINT, _handler)
    return stop


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="edgekit")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True,
              envvar="EDGEKIT_LOG_FORMAT", help="Log lines as text (event key=value) or one JSON object each "
              "(ts, level, logger, event, the line's fields, msg), for agent and hub alike.")
def main(verbose: int, debug: bool, log_format: str) -> None:
    """edgekit: train a sensor model, ship it to edge devices as a signed bundle, run it there, and hand the
    doubtful cases to a person.

    \b
    The path of the data:
      edgekit train skab --out runs/skab                        # server (CUDA if present)
      edgekit export runs/skab --int8 --out bundles/skab        # ONNX, INT8, parity, bundle
      edgekit run --bundle bundles/skab --source replay:FILE    # edge agent (no torch)
      edgekit hub --broker mqtt://127.0.0.1:1883                # collect + review web page
      edgekit demo                                              # all of it, end to end
    """
    _setup_logging(verbose + (1 if debug else 0), log_format)


# --- training side -------------------------------------------------------------------------------


@main.command()
@click.argument("recipe")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Run directory to write.")
@click.option("--extra-labels", type=click.Path(path_type=Path), default=None,
              help="labels.csv from `edgekit labels export`: reviewed cases added to the training split.")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Override the recipe's epochs.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
@handle_errors
def train(recipe: str, out: Path, extra_labels: Path | None, epochs: int | None, no_progress: bool) -> None:
    """Train the predictor, autoencoder gate and second opinion described by RECIPE: a TOML file, or the name
    of a recipe that ships with edgekit (skab, ipol_gait, fall_screening, tug_seed)."""
    require_extra("train")
    from edgekit.exporters.training.train import train as train_fn
    from edgekit.paths import recipe_file

    run_dir = train_fn(recipe_file(recipe), out, extra_labels=extra_labels, epochs=epochs,
                       progress=not no_progress)
    click.echo(f"run written to {run_dir} (report: {run_dir / 'report'})")


@main.command("init")
@click.argument("data_dir", type=click.Path(path_type=Path))
@click.option("--out", default=Path("recipe.toml"), type=click.Path(path_type=Path), show_default=True,
              help="Recipe file to write.")
@click.option("--task", default=None, help="Task name (default: the folder's name).")
@click.option("--force", is_flag=True, help="Overwrite --out if it exists.")
@handle_errors
def init(data_dir: Path, out: Path, task: str | None, force: bool) -> None:
    """Write a training recipe for the recordings in DATA_DIR (CSV/TSV files, one sample per line).

    It finds the delimiter, header, time column and sample rate, the channels, and the labels (a label column,
    or the folder names); each guess is marked GUESS in a comment. Check them, then `edgekit train` the file."""
    from edgekit.errors import ConfigError
    from edgekit.exporters.training.scaffold import write_recipe

    if out.exists() and not force:
        raise ConfigError("exists; pass --force to overwrite it", where=str(out))
    path = write_recipe(data_dir, out, task)
    click.echo(f"recipe written to {path}: check the lines marked GUESS, then `edgekit train {path} --out run`")


@main.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Bundle directory to write.")
@click.option("--int8/--no-int8", default=False, help="Also quantize to INT8 (static QDQ) and check parity; a role "
              "runs INT8 when it passes parity and is faster single-sample on this machine.")
@click.option("--prefer-int8", is_flag=True, help="Quantize (implies --int8) and run INT8 wherever it passes parity, "
              "faster here or not: for a device whose CPU is not this one (an ARM core may run INT8 faster).")
@click.option("--sign-key", type=click.Path(path_type=Path), default=None, help="Ed25519 private key (PEM).")
@click.option("--target-error", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="Largest error rate accepted on cases the device answers alone (overrides the recipe).")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
@handle_errors
def export(run_dir: Path, out: Path, int8: bool, prefer_int8: bool, sign_key: Path | None,
           target_error: float | None, no_progress: bool) -> None:
    """Export RUN_DIR to ONNX (and INT8), check parity, calibrate the gate, write a bundle."""
    require_extra("export")
    from edgekit.exporters.export.export import export as export_fn

    report = export_fn(run_dir, out, int8=int8, sign_key=sign_key, target_error=target_error,
                       progress=not no_progress, prefer_int8=prefer_int8)
    status = "passed" if report.get("passed", True) else "FAILED"
    click.echo(f"bundle written to {out} (parity {status}; see {out / 'parity.json'})")


@main.command()
@click.option("--out", default=Path("keys"), type=click.Path(path_type=Path), show_default=True,
              help="Directory for the key pair.")
@click.option("--name", default="edgekit", show_default=True, help="File name stem.")
@handle_errors
def keygen(out: Path, name: str) -> None:
    """Make an Ed25519 key pair for signing bundles (private key mode 0600)."""
    from edgekit.manifest import keygen as keygen_fn

    priv, pub = keygen_fn(out, name)
    click.echo(f"private key: {priv}\npublic key:  {pub}")


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--pub", required=True, type=click.Path(path_type=Path), help="Ed25519 public key (PEM).")
@click.option("--heldout", is_flag=True, help="Also run the bundle's models on its held-out inputs (heldout.npz) "
              "here and require export's answers: proof that this device's onnxruntime reproduces them.")
@handle_errors
def verify(bundle: Path, pub: Path, heldout: bool) -> None:
    """Check a bundle's signature and the sha256 of every file it lists."""
    from edgekit.manifest import verify_bundle

    m = verify_bundle(bundle, pub)
    click.echo(f"ok: {bundle} ({m.task}, {len(m.files)} files, signature valid)")
    if heldout:
        from edgekit.heldout import check_heldout

        r = check_heldout(bundle, m)
        diffs = ", ".join(f"{role} {d:.2g}" for role, d in r["max_abs"].items())
        click.echo(f"ok: held-out predictions reproduced: labels agree on {r['labels_agree']}/{r['rows']} rows, "
                   f"largest difference {diffs} (allowed {r['atol']:g})")


@main.command("inspect")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--public-key", type=click.Path(path_type=Path), default=None,
              help="Verify the signature with this Ed25519 public key (PEM); a missing or bad one is an error.")
@click.option("--features", "list_features", is_flag=True, help="List every feature name, in model input order.")
@click.option("--json", "as_json", is_flag=True, help="Print the full report as JSON instead.")
@handle_errors
def inspect_cmd(bundle: Path, public_key: Path | None, list_features: bool, as_json: bool) -> None:
    """What a bundle expects and promises: input contract (channels, units, rate, window, features, replay
    layout, plausible range), labels, gate thresholds and expected deferral, parity, hashes and signature.
    Checks every file's sha256 (and the signature with --public-key) first; exit 2 naming the file if one fails.
    Needs only the agent install."""
    import json

    from edgekit.inspection import inspect_bundle, text

    report = inspect_bundle(bundle, public_key=public_key)
    click.echo(json.dumps(report, indent=2) if as_json else text(report, list_features=list_features))


# --- edge side -----------------------------------------------------------------------------------


def _source_from_flag(value: str, speed: float | None) -> dict[str, Any]:
    from edgekit.errors import ConfigError

    kind, _, arg = value.partition(":")
    if kind == "replay" and arg:
        out: dict[str, Any] = {"kind": "replay", "path": arg}
    elif kind == "simulated" and arg:
        out = {"kind": "simulated", "generator": arg}
    elif kind == "serial" and arg:
        port, _, channels = arg.partition("@")  # no @CHANNELS: the bundle's; the rate is the bundle's
        out = {"kind": "serial", "port": port, **({"channels": int(channels)} if channels else {})}
    else:
        raise ConfigError(f"expected replay:PATH, simulated:gait|pump or serial:PORT@CHANNELS (got {value!r})",
                          where="--source")
    if speed is not None and kind in ("replay", "simulated"):
        out["speed"] = speed
    return out


def agent_config(config: Path | None, **flags: Any) -> Any:
    """The agent config from a TOML file and/or flags; flags win. One validation point: edgekit.config."""
    from edgekit.config import AgentConfig, load_toml, validate

    data: dict[str, Any] = load_toml(config) if config else {}
    where = str(config) if config else "command line"
    if flags.get("bundle"):
        data["bundle"] = str(flags["bundle"])
    if flags.get("source"):
        data["source"] = _source_from_flag(flags["source"], flags.get("speed"))
    elif flags.get("speed") is not None and isinstance(data.get("source"), dict):
        data["source"]["speed"] = flags["speed"]
    if flags.get("broker") is not None:
        data.setdefault("mqtt", {})["url"] = flags["broker"] or None
    for key, name in (("device_id", "device_id"), ("site", "site")):
        if flags.get(key):
            data[name] = flags[key]
    if flags.get("public_key"):
        data["public_key"] = str(flags["public_key"])
    if flags.get("allow_unsigned"):
        data["allow_unsigned"] = True
    if flags.get("outbox"):
        data.setdefault("outbox", {})["path"] = str(flags["outbox"])
    if flags.get("batch_interval") is not None:
        data.setdefault("mqtt", {})["batch_interval_s"] = flags["batch_interval"]
    cfg = validate(AgentConfig, data, where)
    if config:
        from edgekit.config import _resolve_paths

        cfg = _resolve_paths(cfg, config.parent)
    return cfg


@main.command()
@click.option("--config", "config", type=click.Path(path_type=Path), default=None, help="agent.toml.")
@click.option("--bundle", type=click.Path(path_type=Path), default=None, help="Bundle directory.")
@click.option("--source", default=None, help="replay:PATH, simulated:gait|pump or serial:PORT@CHANNELS.")
@click.option("--speed", type=float, default=None, help="Replay speed: 1 real time, N faster, 0 max.")
@click.option("--broker", default=None, help="mqtt://HOST:PORT; '' for outbox only.")
@click.option("--device-id", default=None, help="This device's id.")
@click.option("--site", default=None, help="Site name.")
@click.option("--outbox", type=click.Path(path_type=Path), default=None, help="Outbox SQLite file.")
@click.option("--public-key", type=click.Path(path_type=Path), default=None,
              help="Refuse the bundle unless its signature verifies with this Ed25519 public key.")
@click.option("--allow-unsigned", is_flag=True,
              help="Run the bundle without a public key, its signature unchecked (a lab or a bench); the "
                   "status says signature 'unchecked'. Without it, --public-key or public_key is required.")
@click.option("--batch-interval", type=float, default=None, help="Seconds per batched result message.")
@click.option("--drain-timeout", type=float, default=30.0, show_default=True,
              help="At the end (source ended, or SIGTERM), wait up to this long for the broker to take the "
                   "backlog. While the broker is unreachable a SIGTERM ends the wait at once.")
@handle_errors
def run(config: Path | None, drain_timeout: float, **flags: Any) -> None:
    """Run the edge agent: read a sensor stream, window it, run the gate and models, publish over MQTT.

    Results go to a disk outbox first and leave it only when the broker acknowledges them. At the end
    of a finite source the agent drains what it can and prints a one-line summary; rows left behind are
    named in an `agent.queued` log line (count, outbox file, broker, why) and sent after the next start.

    \b
    Exit 0 when done, or when stopped by SIGTERM/SIGINT (even with rows still queued), or without a broker;
    exit 4 when the source ended but results stay queued because the broker was unreachable or the drain
    timed out (a systemd unit with Restart=on-failure or always starts it again, retrying the broker).
    """
    from edgekit.agent import run_agent

    cfg = agent_config(config, **flags)
    stop = stop_on_signals()
    summary = run_agent(cfg, stop=stop, drain_timeout_s=drain_timeout)
    if not cfg.mqtt.url:
        click.echo(f"no broker: {summary.queued} results wait in the outbox {cfg.outbox.path}", err=True)
    click.echo(summary.line())
    if cfg.mqtt.url and summary.queued and not stop.is_set():
        sys.exit(EXIT_QUEUED)


@main.command("check-config")
@click.argument("file", type=click.Path(path_type=Path))
@handle_errors
def check_config(file: Path) -> None:
    """Validate an agent config (agent.toml) or a training recipe and say what is wrong, key by key."""
    from edgekit.config import AgentConfig, load_toml, validate

    data = load_toml(file)
    if "source" in data or "bundle" in data:
        validate(AgentConfig, data, str(file))
        kind = "agent config"
    else:
        from edgekit.recipe import Recipe

        validate(Recipe, data, str(file))
        kind = "recipe"
    click.echo(f"ok: {file} is a valid {kind}")


@main.group()
def device() -> None:
    """Device profiles (devices/profiles/*.toml)."""


@device.command("detect")
@click.option("--root", type=click.Path(path_type=Path), default=Path("/"), help="Filesystem root to inspect.")
@handle_errors
def device_detect(root: Path) -> None:
    """Print the profile that fits this machine."""
    from edgekit.devices.detect import describe, detect

    click.echo(describe(detect(root)))


# --- hub -----------------------------------------------------------------------------------------


@main.group(invoke_without_command=True)
@click.option("--broker", default="mqtt://127.0.0.1:1883", show_default=True,
              help="mqtt://[USER@]HOST[:PORT] (an MQTT 5 broker), or mqtts://... for TLS (port 8883 by default); "
                   "nats://HOST:4222,HOST:4222,... to consume a NATS cluster's JetStream (its MQTT gateway; "
                   "deploy/cluster/README.md).")
@click.option("--db", default="sqlite:///hub.db", show_default=True, help="sqlite:///FILE or postgresql://...")
@click.option("--http", default="127.0.0.1:8080", show_default=True, help="HOST:PORT for the review page; '' for none.")
@click.option("--share-group", default="edgekit-hub", show_default=True,
              help="MQTT v5 shared subscription group (nats://: the durable consumer's name): hubs in one group "
                   "split the results; '' for a plain subscription (one hub).")
@click.option("--ack-wait-s", type=click.FloatRange(min=0, min_open=True), default=None,
              help="nats:// only: seconds before what a dead hub took and never acknowledged goes to another "
                   "hub [default: 30].")
@click.option("--client-id", default=None,
              help="Fixed MQTT client id, one per hub process: the broker keeps this hub's session and queues "
                   "results for it while it is down (a day). Without it the session lasts 5 minutes.")
@click.option("--username", default=None, help="Broker account (deploy/mosquitto/acl.example: 'hub').")
@click.option("--password-file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="File whose first line is the broker password, read when connecting (or set "
                   "EDGEKIT_MQTT_PASSWORD).")
@click.option("--ca-file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="mqtts://: PEM file with the CA that signed the broker's certificate [default: the system's "
                   "CAs].")
@click.option("--cert-file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="mqtts://: PEM client certificate, for a broker that requires one (with --key-file).")
@click.option("--key-file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="PEM private key (unencrypted) of --cert-file.")
@click.option("--secure-cookies", is_flag=True,
              help="Send the session cookie over HTTPS only (set when a TLS proxy serves the review page).")
@click.option("--retention-days", type=click.IntRange(min=1), default=None,
              help="Delete trials and results (with their labels) the hub received more than N days ago, at "
                   "start and hourly. Default: keep everything, since deleting cannot be undone and labelled "
                   "cases are the next training's data; set N from your data-protection rules.")
@click.pass_context
@handle_errors
def hub(ctx: click.Context, broker: str, db: str, http: str, share_group: str, ack_wait_s: float | None,
        client_id: str | None,
        username: str | None, password_file: Path | None, ca_file: Path | None, cert_file: Path | None,
        key_file: Path | None, secure_cookies: bool, retention_days: int | None) -> None:
    """Collect results from every device and serve the review station."""
    require_extra("hub")
    ctx.obj = {"db": db}
    if ctx.invoked_subcommand is not None:
        return
    import os

    from edgekit.config import validate
    from edgekit.hub import run_hub
    from edgekit.mqtt import MqttSecurity, redact_url

    given = {"username": username, "password_file": password_file, "ca_file": ca_file, "cert_file": cert_file,
             "key_file": key_file,
             "password": None if password_file else os.environ.get("EDGEKIT_MQTT_PASSWORD")}
    security = validate(MqttSecurity, {k: v for k, v in given.items() if v is not None}, "edgekit hub")
    stop = stop_on_signals()
    click.echo(f"hub: broker {redact_url(broker)}, db {redact_url(db)}, review page http://{http}/" if http
               else "hub: ingest only")
    run_hub(broker, db, http or None, share_group=share_group, client_id=client_id, stop=stop,
            security=security, secure_cookies=secure_cookies, retention_days=retention_days,
            ack_wait_s=ack_wait_s)


@hub.command("adduser")
@click.argument("name")
@click.option("--password", prompt=True, hide_input=True, confirmation_prompt=True,
              help="Password (prompted when not given).")
@click.pass_context
@handle_errors
def hub_adduser(ctx: click.Context, name: str, password: str) -> None:
    """Create a reviewer (password stored as a salted hash)."""
    from edgekit.hub import add_user

    add_user(ctx.obj["db"], name, password)
    click.echo(f"reviewer {name!r} added")


@hub.command("add-device")
@click.argument("name")
@click.option("--site", required=True, help="The device's site (its agent.toml `site`).")
@click.option("--passwd", type=click.Path(path_type=Path, dir_okay=False), default=Path("/etc/mosquitto/passwd"),
              show_default=True, help="The broker's password_file (created 0640 when missing).")
@click.option("--acl", type=click.Path(path_type=Path, dir_okay=False), default=Path("/etc/mosquitto/acl"),
              show_default=True, help="The broker's acl_file (a new one starts with the hub account's block).")
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), default=Path("."), show_default=True,
              help="Folder for NAME.pw, the device's password file (mode 0600): copy it to the device.")
@handle_errors
def hub_add_device(name: str, site: str, passwd: Path, acl: Path, out: Path) -> None:
    """Create device NAME's broker account: a random password (in OUT/NAME.pw for the device; its hash in the
    broker's password file, by mosquitto_passwd when installed) and the ACL block that lets it write only
    edgekit/v1/SITE/NAME/... and read only its own commands. Then reload the broker (SIGHUP)."""
    from edgekit.hub.credential import add_device

    made = add_device(name, site, passwd=passwd, acl=acl, out_dir=out)
    click.echo(f"device {name} at site {site}: broker account {name!r}\n"
               f"  {made.device_password_file}: its password (0600): copy it to the device, e.g. "
               f"/etc/edgekit/mqtt.pw, then delete this copy\n"
               f"  {made.broker_password_file}: entry added ({made.hashed_by})\n"
               f"  {made.acl_file}: {made.acl_lines} ACL lines added\n"
               f"  reload the broker: kill -HUP \"$(pidof mosquitto)\" (compose: docker compose kill -s HUP "
               f"mosquitto)\n"
               f"  its agent.toml: device_id = \"{name}\", site = \"{site}\", and in [mqtt] username = \"{name}\", "
               f"password_file = \"/etc/edgekit/mqtt.pw\"")


@hub.group("participant")
def hub_participant() -> None:
    """Everything the hub holds for one participant, by pseudonym (`edgekit pseudonym` on the station)."""


def _rows(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {table.removeprefix('edgekit_')}" for table, n in counts.items())


@hub_participant.command("export")
@click.argument("pseudonym")
@click.option("--db", default=None, help="Hub database URL [default: edgekit hub's --db].")
@click.option("--out", required=True, type=click.Path(path_type=Path, dir_okay=False),
              help="JSON file to write (mode 0600: it is personal data).")
@click.pass_context
@handle_errors
def hub_participant_export(ctx: click.Context, pseudonym: str, db: str | None, out: Path) -> None:
    """Write every row the hub holds for PSEUDONYM (trials, and the results and labels filed under them)."""
    from edgekit.hub import export_participant

    counts = export_participant(db or ctx.obj["db"], pseudonym, out)
    click.echo(f"{pseudonym}: {_rows(counts)} written to {out}")


@hub_participant.command("delete")
@click.argument("pseudonym")
@click.option("--db", default=None, help="Hub database URL [default: edgekit hub's --db].")
@click.option("--yes", is_flag=True, help="Delete without asking.")
@click.pass_context
@handle_errors
def hub_participant_delete(ctx: click.Context, pseudonym: str, db: str | None, yes: bool) -> None:
    """Delete every row the hub holds for PSEUDONYM, in one transaction (export it first if it is asked for)."""
    from edgekit.hub import count_participant, delete_participant

    url = db or ctx.obj["db"]
    if not yes:
        counts = count_participant(url, pseudonym)
        if not any(counts.values()):
            click.echo(f"{pseudonym}: the hub holds nothing")
            return
        click.confirm(f"delete {_rows(counts)} of {pseudonym}? This cannot be undone", abort=True)
    click.echo(f"{pseudonym}: deleted {_rows(delete_participant(url, pseudonym))}")


@main.command()
@click.option("--salt-file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="The station's salt [default: STATE_DIR/participant-salt, STATE_DIR being "
                   "$EDGEKIT_STATE_DIR or ~/.local/state/edgekit].")
@click.option("--code", prompt="participant code", hide_input=True,
              help="The participant's code; asked for (not shown, not in the shell history) when not given.")
@handle_errors
def pseudonym(salt_file: Path | None, code: str) -> None:
    """Print the pseudonym this station gives a participant code: what its trials carry and the hub stores,
    for `edgekit hub participant export|delete`. Run it on the station (its salt stays there)."""
    from edgekit.privacy import device_salt
    from edgekit.privacy import pseudonym as make

    click.echo(make(code, device_salt(salt_file, create=False)))


@main.group()
@handle_errors
def labels() -> None:
    """Reviewed labels, for the next training run."""
    require_extra("labels")


@labels.command("export")
@click.option("--db", default="sqlite:///hub.db", show_default=True, help="Hub database URL.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="CSV to write.")
@handle_errors
def labels_export(db: str, out: Path) -> None:
    """Write reviewed cases (latest label each) to CSV; feed it to `edgekit train --extra-labels`."""
    from edgekit.hub import export_labels

    n = export_labels(db, out)
    click.echo(f"{n} labelled cases written to {out}")


# `edgekit deploy`: the rollout stopped (a device rolled back, refused the bundle or did not answer in time).
EXIT_ROLLOUT_STOPPED = 5


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path, file_okay=False))
@click.option("--site", required=True, help="The devices' site.")
@click.option("--url", "hub_url", required=True,
              help="The hub's web address as the devices reach it (http(s)://HOST:PORT); they fetch the bundle from "
                   "URL/bundles/DEPLOYMENT.")
@click.option("--devices", default="", help="Comma-separated device ids, canaries first [default: every device of "
                                            "the site the hub has heard from, by name].")
@click.option("--canary", type=click.IntRange(min=0), default=1, show_default=True,
              help="How many of the devices go first; the rest follow once each runs the bundle healthy through its "
                   "watch. 0: all at once.")
@click.option("--watch-s", type=click.FloatRange(min=0), default=120.0, show_default=True,
              help="Seconds each device watches the new bundle's deferral and quarantine rates after the swap.")
@click.option("--min-windows", type=click.IntRange(min=0), default=20, show_default=True,
              help="Windows the watch needs at least, however long that takes.")
@click.option("--deferral-band", default="0,0.5", show_default=True,
              help="LOW,HIGH: a deferral rate (deferred / windows) outside it during the watch rolls the device back.")
@click.option("--quarantine-band", default="0,0.05", show_default=True,
              help="LOW,HIGH: the same for the quarantine rate (quarantined / items read).")
@click.option("--timeout-s", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Seconds each phase may take before a silent device stops the rollout [default: watch-s + 300].")
@click.option("--public-key", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Also check the bundle's signature here before sending it (each device checks it anyway).")
@click.option("--db", default="sqlite:///hub.db", show_default=True, help="The hub's database URL.")
@click.option("--broker", default="mqtt://127.0.0.1:1883", show_default=True,
              help="mqtt://[USER@]HOST[:PORT] or mqtts://..., as the hub's account (it writes command topics).")
@click.option("--username", default=None, help="Broker account (the hub's: 'hub').")
@click.option("--password-file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="File whose first line is the broker password (or EDGEKIT_MQTT_PASSWORD).")
@click.option("--ca-file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="CA certificate (PEM) for an mqtts:// broker with a private CA.")
@click.option("--cert-file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Client certificate (PEM), with --key-file.")
@click.option("--key-file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Client certificate's private key (PEM).")
@handle_errors
def deploy(bundle: Path, site: str, hub_url: str, devices: str, canary: int, watch_s: float, min_windows: int,
           deferral_band: str, quarantine_band: str, timeout_s: float | None, public_key: Path | None, db: str,
           broker: str, username: str | None, password_file: Path | None, ca_file: Path | None,
           cert_file: Path | None, key_file: Path | None) -> None:
    """Roll BUNDLE out to the devices of a site through the hub: canaries first, then the rest.

    Each device gets a retained bundle command with its own token, fetches the bundle from the hub, checks its
    signature, input contract and on-device parity, swaps it in while it runs and watches it; it rolls back by
    itself. Prints progress; exits 0 when every device runs the bundle healthy, 5 when the rollout stopped.
    The hub (edgekit hub, with --http) must be running on the same database and broker.
    """
    require_extra("deploy")
    import os

    from edgekit.config import validate
    from edgekit.hub.deploy import DeploySpec, parse_band
    from edgekit.hub.deploy import deploy as run_deploy
    from edgekit.mqtt import MqttSecurity

    given = {"username": username, "password_file": password_file, "ca_file": ca_file, "cert_file": cert_file,
             "key_file": key_file, "password": None if password_file else os.environ.get("EDGEKIT_MQTT_PASSWORD")}
    security = validate(MqttSecurity, {k: v for k, v in given.items() if v is not None}, "edgekit deploy")
    spec = DeploySpec(bundle=bundle, site=site, url=hub_url,
                      devices=tuple(d.strip() for d in devices.split(",") if d.strip()), canary=canary,
                      watch_s=watch_s, min_windows=min_windows,
                      deferral_band=parse_band(deferral_band, "deploy --deferral-band"),
                      quarantine_band=parse_band(quarantine_band, "deploy --quarantine-band"), timeout_s=timeout_s,
                      public_key=public_key)
    outcome = run_deploy(db, broker, spec, lambda line: click.echo(line, nl=True), security=security,
                         stop=stop_on_signals())
    if outcome.state != "done":
        sys.exit(EXIT_ROLLOUT_STOPPED)


@main.command()
@click.option("--workdir", type=click.Path(path_type=Path), default=None,
              help="Where runs, bundles, keys, broker files and the outbox go [default: STATE_DIR/demo, "
                   "STATE_DIR being $EDGEKIT_STATE_DIR or ~/.local/state/edgekit].")
@click.option("--fault-file", default="valve1/1.csv", show_default=True,
              help="SKAB fault file (under skab/data) that the agent replays.")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Override the recipe's epochs.")
@handle_errors
def demo(workdir: Path | None, fault_file: str, epochs: int | None) -> None:
    """Run the whole path end to end: train, export INT8 + sign, verify, run the agent through a local
    broker on a recorded fault, and show the results and the deferred cases."""
    require_extra("demo")
    from edgekit.demo import run_demo
    from edgekit.paths import state_dir

    run_demo(workdir or state_dir() / "demo", click.echo, fault_file=fault_file, epochs=epochs)


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--rounds", type=click.IntRange(min=10), default=2000, show_default=True, help="Timed windows per row.")
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None, help="Write results as JSON.")
@handle_errors
def bench(bundle: Path, rounds: int, json_out: Path | None) -> None:
    """Per-window latency of this bundle on this device: each model fp32 vs INT8, and the whole edge path
    against its onnxruntime floor (numpy + onnxruntime only, so it runs on the device itself)."""
    import json

    from edgekit.bench import run_bench, table

    result = run_bench(bundle, rounds=rounds)
    click.echo(table(result))
    if json_out:
        json_out.write_text(json.dumps(result, indent=2))


@main.command("eval")
@click.argument("name", type=click.Choice(["skab", "fall-screening", "ipol", "deferral", "trials", "sensor-faults",
                                                "incidents", "review-loop"]))
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None, help="Write results as JSON.")
@click.option("--plot", "plot_out", type=click.Path(path_type=Path), default=None,
              help="Where the plot (PNG) goes [default: STATE_DIR/eval/NAME.png, STATE_DIR being "
                   "$EDGEKIT_STATE_DIR or ~/.local/state/edgekit].")
@handle_errors
def evaluate(name: str, json_out: Path | None, plot_out: Path | None) -> None:
    """Evaluate on real data against the published results (run by hand; minutes, not seconds)."""
    require_extra("eval")
    from edgekit.exporters.evaluation.evaluate import EVALUATIONS, TABLES
    from edgekit.paths import state_dir

    plot_out = plot_out or state_dir() / "eval" / f"{name}.png"
    result = EVALUATIONS[name](json_out, plot_out, progress=True)
    click.echo(TABLES[name](result))
    written = [f"plot: {plot_out}"] if plot_out.is_file() else []  # `trials` is a table of counts, no plot
    written += [f"json: {json_out}"] if json_out else []
    if written:
        click.echo(", ".join(written))


if __name__ == "__main__":  # pragma: no cover
    main()
