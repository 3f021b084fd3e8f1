"""deploy/: the compose project (broker with TLS and accounts, PostgreSQL, hub), the agent's systemd unit and
the Dockerfiles, checked as far as a machine without a Docker engine can (issue 16): the YAML's services and
mounts, the hub's command line parsed by edgekit's own CLI, and the compose broker config started by a real
mosquitto with make-certs' certificates and add-device's accounts."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from edgekit import topics
from edgekit.broker import Mosquitto, free_port, installed
from edgekit.cli import main

yaml = pytest.importorskip("yaml", reason="PyYAML (the dev extra)")
DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
# What the operator makes before `docker compose up` (deploy/README.md "Compose"); git ignores all of it.
MADE = {"compose/certs", "compose/accounts", "compose/devices", "compose/secrets/hub-mqtt.pw"}
SIZES = ("max_queued_messages", "max_queued_bytes", "max_inflight_messages", "max_packet_size", "set_tcp_nodelay",
         "autosave_interval", "persistent_client_expiration", "per_listener_settings")


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def bind_sources(service: dict[str, Any]) -> list[str]:
    return [v.split(":")[0] for v in service.get("volumes", []) if v.startswith("./")]


def test_the_compose_project_has_a_broker_a_database_and_a_hub_and_its_files_exist_or_are_made() -> None:
    doc = compose()
    services = doc["services"]
    assert set(services) == {"mosquitto", "postgres", "hub"}
    mounted = {s.removeprefix("./") for svc in services.values() for s in bind_sources(svc)}
    mounted |= {s["file"].removeprefix("./") for s in doc.get("secrets", {}).values()}
    shipped = mounted - MADE
    assert shipped == {"compose/mosquitto.conf"} and all((DEPLOY / p).is_file() for p in shipped)
    assert MADE <= mounted
    for made in MADE:  # secrets and accounts are never committed
        assert subprocess.run(["git", "check-ignore", "-q", str(DEPLOY / made / "x")], cwd=DEPLOY).returncode == 0
    # only the devices' TLS listener is published; the hub's page on loopback only
    assert services["mosquitto"]["ports"] == ["8883:8883"] and services["hub"]["ports"] == ["127.0.0.1:8080:8080"]
    build = services["hub"]["build"]
    assert (COMPOSE.parent / build["context"] / build["dockerfile"]).is_file()
    assert "hub_mqtt_password" in services["hub"]["secrets"]
    env = services["postgres"]["environment"]
    assert services["postgres"]["healthcheck"]["test"][-4:] == ["-U", env["POSTGRES_USER"], "-d", env["POSTGRES_DB"]]
    assert services["hub"]["depends_on"]["postgres"]["condition"] == "service_healthy"


def hub_params() -> dict[str, Any]:
    """Dockerfile.hub's ENTRYPOINT plus compose's command, parsed by edgekit's CLI (nothing runs)."""
    entry = next(json.loads(line.split(None, 1)[1]) for line in (DEPLOY / "docker" / "Dockerfile.hub").read_text()
                 .splitlines() if line.startswith("ENTRYPOINT"))
    assert entry[0] == "edgekit"
    args = [*entry[1:], *compose()["services"]["hub"]["command"]]
    ctx = main.make_context("edgekit", args)
    name, *rest = [*getattr(ctx, "_protected_args", []), *ctx.args]  # click 9: all in ctx.args
    assert name == "hub"
    return main.get_command(ctx, name).make_context(name, rest, parent=ctx).params


def test_the_hub_command_line_parses_and_points_at_the_compose_services() -> None:
    params = hub_params()
    services = compose()["services"]
    env = services["postgres"]["environment"]
    assert params["db"] == f"postgresql://{env['POSTGRES_USER']}@postgres:5432/{env['POSTGRES_DB']}"  # later --db wins
    assert "password" not in params["db"] and "PGPASSWORD" in services["hub"]["environment"]
    assert params["broker"] == "mqtt://mosquitto:1883" and params["username"] == "hub"
    assert str(params["password_file"]) == "/run/secrets/hub_mqtt_password" and params["client_id"]
    assert params["http"] == "0.0.0.0:8080"


def _settings(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and " " in line:
            key, value = line.split(None, 1)
            out.setdefault(key, value)
    return out


def test_the_compose_broker_is_sized_as_production_conf() -> None:
    mine, prod = (_settings(p.read_text()) for p in (DEPLOY / "compose" / "mosquitto.conf",
                                                      DEPLOY / "mosquitto" / "production.conf"))
    assert {k: mine[k] for k in SIZES} == {k: prod[k] for k in SIZES}


@pytest.mark.broker
def test_the_compose_broker_config_serves_devices_over_tls_and_the_hub_with_accounts(tmp_path: Path) -> None:
    """make-certs' CA and certificate, add-device's accounts, compose's mosquitto.conf with only its paths and
    ports moved: a device over TLS (checking the broker against the CA) reaches the hub's account."""
    from test_credentials import Client, _add_hub, cli_add, password

    if installed() is None:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
    work = tmp_path / "compose"
    work.mkdir()
    shutil.copy(DEPLOY / "compose" / "make-certs", work / "make-certs")
    made = subprocess.run(["sh", str(work / "make-certs"), "localhost", "127.0.0.1"], capture_output=True, text=True,
                          timeout=60)
    assert made.returncode == 0, made.stderr
    assert (work / "ca" / "ca.key").stat().st_mode & 0o077 == 0 and not (work / "certs" / "ca.key").exists()
    accounts = tmp_path / "accounts"
    accounts.mkdir()
    assert cli_add(accounts, "pump7", "plant1").returncode == 0
    _add_hub(accounts, "hubpw")
    broker = Mosquitto(tmp_path / "broker")
    device_port = free_port()
    conf = (DEPLOY / "compose" / "mosquitto.conf").read_text()
    for old, new in (("/mosquitto/data/", f"{tmp_path}/broker/"), ("/mosquitto/certs", str(work / "certs")),
                     ("/mosquitto/accounts/passwd", str(accounts / "passwd")),
                     ("/mosquitto/accounts/acl", str(accounts / "acl")),
                     ("listener 1883\n", f"listener {broker.port} 127.0.0.1\n"),
                     ("listener 8883\n", f"listener {device_port} 127.0.0.1\n")):
        assert old in conf, old
        conf = conf.replace(old, new)
    assert not [line for line in conf.splitlines() if "/mosquitto/" in line and not line.startswith("#")]
    broker.conf.write_text(conf + "user root\n")
    with broker:
        hub = Client(broker.port, "hub", "hubpw")
        device = Client(device_port, "pump7", password(accounts, "pump7"), ca=work / "certs" / "ca.crt")
        try:
            assert hub.accepted and device.accepted
            hub.c.subscribe(f"{topics.PREFIX}/#", qos=1)
            time.sleep(0.3)
            device.publish(topics.topic("plant1", "pump7", "result"), b'{"n": 1}')
            device.publish(topics.topic("plant1", "pump8", "result"), b'{"n": 2}')  # not its topic: dropped
            deadline = time.monotonic() + 10
            while not hub.got and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.3)
            assert hub.got == [(topics.topic("plant1", "pump7", "result"), b'{"n": 1}')]
        finally:
            hub.close()
            device.close()


def test_the_agent_unit_reads_serial_ports_and_nothing_else() -> None:
    unit = (DEPLOY / "systemd" / "edgekit-agent.service").read_text()
    assert "SupplementaryGroups=dialout" in unit and "DevicePolicy=closed" in unit
    allowed = re.findall(r"^DeviceAllow=char-(\w+) rw$", unit, re.MULTILINE)
    assert {"ttyUSB", "ttyACM", "ttyAMA", "ttyS"} <= set(allowed)
    assert not re.search(r"^PrivateDevices=", unit, re.MULTILINE)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_accepts_the_units(tmp_path: Path) -> None:
    for name in ("edgekit-agent.service", "edgekit-hub.service"):
        text = (DEPLOY / "systemd" / name).read_text().replace("/opt/edgekit/bin/edgekit", "/bin/true")
        (tmp_path / name).write_text(text)
        out = subprocess.run(["systemd-analyze", "verify", str(tmp_path / name)], capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 0 and not out.stderr.strip(), (name, out.stderr)


def test_the_dockerfiles_copy_what_exists_and_the_jetson_one_says_where_onnxruntime_gpu_comes_from() -> None:
    root = DEPLOY.parent
    for name in ("Dockerfile.agent", "Dockerfile.hub", "Dockerfile.agent-jetson"):
        text = (DEPLOY / "docker" / name).read_text()
        for line in text.splitlines():
            if line.startswith("COPY "):
                assert all((root / src).exists() for src in line.split()[1:-1]), (name, line)
        assert "torch" not in text or "find_spec('torch') is None" in text
    jetson = (DEPLOY / "docker" / "Dockerfile.agent-jetson").read_text()
    assert re.search(r"^FROM \$\{L4T_BASE\}", jetson, re.MULTILINE) and "l4t-jetpack" in jetson
    assert "onnxruntime-gpu" in jetson and "pypi.jetson-ai-lab" in jetson and "Jetson_Zoo" in jetson
    assert "pip uninstall -y onnxruntime" in jetson  # the CPU wheel out before the GPU one goes in
