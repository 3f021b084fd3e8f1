"""edgekit/mqtt.py, the one MQTT module: broker urls (a bad one names its key and never shows the password),
the account and TLS fields of the agent config and the hub's options, and the one client setup against real
mosquittos over TLS: the MQTT source with an account from a password file and a CA file, the hub with a CA
file and an account, the transport with a client certificate."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import orjson
import paho.mqtt.client as mqtt
import pytest
from messagefactory import result
from test_hub_identity import _password_file
from test_hub_ingest import HubCli, wait_for
from test_transport import _tls_files

from edgekit.broker import Mosquitto, installed
from edgekit.config import AgentConfig, load_config
from edgekit.errors import ConfigError
from edgekit.hub.db import HubDB
from edgekit.mqtt import Endpoint, MqttSecurity, make_client, parse_url, redact_url
from edgekit.source import open_source
from edgekit.transport import Transport
from edgekit.values import Sample

ROOT = Path(__file__).resolve().parent.parent
SECRET = "s3cret-Pw"


# --- urls ------------------------------------------------------------------------------------------


def test_urls_give_host_port_tls_and_the_account_they_carry() -> None:
    assert parse_url("mqtt://10.0.0.5") == Endpoint("10.0.0.5", 1883, False)
    assert parse_url("mqtts://broker.example") == Endpoint("broker.example", 8883, True)
    edge = parse_url("mqtts://edge%40x:p%3Aw@broker.example:9000/")
    assert edge == Endpoint("broker.example", 9000, True, "edge@x", "p:w") and str(edge) == "broker.example:9000"
    assert "p:w" not in repr(edge)
    assert str(parse_url("mqtt://[::1]:1884")) == "[::1]:1884"


@pytest.mark.parametrize("url", [
    f"http://edge:{SECRET}@broker:1883",       # not mqtt
    f"edge:{SECRET}@broker",                    # no scheme
    f"mqtt://edge:{SECRET}@",                   # no host
    f"mqtt://edge:{SECRET}@broker:notaport",
    f"mqtt://edge:{SECRET}@broker:0",
    f"mqtt://edge:{SECRET}@broker:70000",
    f"mqtt://edge:{SECRET}@broker/topic",       # a path
    "mqtt://edge:pa/ss@broker:1883",           # an unescaped '/' ends the host part inside the password
    f"mqtt://edge:{SECRET}@[::1",
])
def test_a_bad_url_names_its_key_and_never_shows_the_password(url: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_url(url, where="source.url")
    text = str(err.value)
    assert text.startswith("source.url '") and "mqtt://" in text, text
    assert SECRET not in text and "pa/ss" not in text and "ss@" not in text, text


def test_redact_url_hides_only_the_password() -> None:
    assert redact_url(f"mqtts://edge:{SECRET}@broker:8883") == "mqtts://edge:REDACTED@broker:8883"
    assert redact_url(f"mqtt://edge:a@b/c{SECRET}@broker") == "mqtt://edge:REDACTED@broker"
    assert redact_url("mqtt://edge@broker:1883") == "mqtt://edge@broker:1883"
    assert redact_url("mqtt://broker:1883") == "mqtt://broker:1883"
    assert redact_url(f"postgresql://hub:{SECRET}@db/hub") == "postgresql://hub:REDACTED@db/hub"


# --- the config: one model for the account and TLS files, checked without reading anything ----------


def _config(tmp_path: Path, mqtt: str, source: str = "") -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(f'bundle = "b"\nallow_unsigned = true\n[source]\nkind = "mqtt"\ntopic = "sensors/1"\nchannels = 2\n{source}\n'
                    f"[mqtt]\n{mqtt}\n")
    return path


@pytest.mark.parametrize("mqtt, source, key, words", [
    (f'url = "mqtt://edge:{SECRET}@host:nope"', "", "mqtt.url", "a bad port"),
    (f'url = "mqtt://host"\nusername = "edge"\npassword = "{SECRET}"\npassword_file = "pw"', "",
     "mqtt.password_file", "not both"),
    ('url = "mqtts://host"\ncert_file = "c.pem"', "", "mqtt.key_file", "go together"),
    ('url = "mqtt://host"\nca_file = "ca.pem"', "", "mqtt.url", "mqtt.ca_file: a TLS file for a plain mqtt://"),
    (f'url = "mqtt://host"\npassword = "{SECRET}"', "", "mqtt.url", "mqtt.username: a password needs a user name"),
    (f'url = "mqtt://edge:{SECRET}@host"\npassword_file = "pw"', "", "mqtt.url",
     "mqtt.password_file: the password is given twice"),
    (f'password = {{x = "{SECRET}"}}', "", "mqtt.password", "valid string"),
    ('url = "mqtt://host"', 'username = "gw"', "source.url", "need its own url"),
    ('url = "mqtt://host"', f'url = "mqtt://gw:{SECRET}@gw"\nusername = "gw"', "source.url",
     "source.username: the user name is given twice"),
    ('url = "mqtt://host"', 'url = "mqtt://gw"\nkey_file = "k.pem"', "source.key_file", "go together"),
])
def test_the_config_checks_the_account_and_tls_fields_and_never_shows_the_password(
        tmp_path: Path, mqtt: str, source: str, key: str, words: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(_config(tmp_path, mqtt, source), AgentConfig)
    line = next((x for x in str(err.value).splitlines() if f": {key}: " in x), None)
    assert line is not None and words in line, str(err.value)
    assert SECRET not in str(err.value)


def test_config_files_are_relative_to_the_config_and_the_password_stays_out_of_reprs(tmp_path: Path) -> None:
    path = _config(tmp_path, f'url = "mqtts://host"\nusername = "edge"\npassword = "{SECRET}"\nca_file = "ca.pem"\n'
                   'cert_file = "/etc/edge.crt"\nkey_file = "edge.key"',
                   'url = "mqtts://gw"\nusername = "gw"\npassword_file = "gw.pw"')
    cfg = load_config(path, AgentConfig)
    assert (cfg.mqtt.ca_file, cfg.mqtt.cert_file, cfg.mqtt.key_file) == (
        tmp_path / "ca.pem", Path("/etc/edge.crt"), tmp_path / "edge.key")
    assert cfg.source.password_file == tmp_path / "gw.pw"  # type: ignore[union-attr]
    assert SECRET not in repr(cfg) and SECRET not in str(cfg.model_dump())
    assert cfg.mqtt.password is not None and cfg.mqtt.password.get_secret_value() == SECRET


# --- files read when the client is built ----------------------------------------------------------


def test_a_password_or_tls_file_that_will_not_load_is_a_config_error_naming_it(tmp_path: Path) -> None:
    tls = _tls_files(tmp_path)
    plain, secure = parse_url("mqtt://127.0.0.1:1"), parse_url("mqtts://127.0.0.1:1")
    empty = tmp_path / "empty.pw"
    empty.write_text("\nsecond line\n")
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello\n")
    cases = [
        (plain, MqttSecurity(username="edge", password_file=tmp_path / "missing.pw"), "mqtt.password_file",
         "missing.pw", "cannot read the password file"),
        (plain, MqttSecurity(username="edge", password_file=empty), "mqtt.password_file", "empty.pw",
         "first line is empty"),
        (secure, MqttSecurity(ca_file=tmp_path / "no-ca.pem"), "mqtt.ca_file", "no-ca.pem", "cannot read"),
        (secure, MqttSecurity(ca_file=not_pem), "mqtt.ca_file", "not.pem", "cannot load the CA certificates"),
        (secure, MqttSecurity(cert_file=tmp_path / "no.crt", key_file=tls["client_key"]), "mqtt.cert_file",
         "no.crt", "cannot read"),
        (secure, MqttSecurity(cert_file=tls["client_cert"], key_file=tls["key"]), "mqtt.cert_file",
         "client.crt", "cannot load the client certificate and key"),  # the server's key: not this cert's
    ]
    for endpoint, security, key, name, words in cases:
        with pytest.raises(ConfigError) as err:
            make_client(endpoint, security, client_id="t")
        assert key in str(err.value) and name in str(err.value) and words in str(err.value), str(err.value)
    reader = open_source(load_config(_config(tmp_path, 'url = "mqtt://127.0.0.1:1"', 'url = "mqtt://127.0.0.1:1"\n'
                                             'username = "gw"\npassword_file = "gw.pw"'), AgentConfig).source)
    with pytest.raises(ConfigError, match=r"source\.password_file .*gw\.pw: cannot read"):
        reader.__enter__()


def test_the_hub_options_have_help_and_their_errors_name_the_option_not_the_password(tmp_path: Path) -> None:
    pytest.importorskip("sqlalchemy", reason="the hub extra")

    def hub(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "edgekit", "hub", "--http", "", "--db",
                               f"sqlite:///{tmp_path / 'hub.db'}", *args], capture_output=True, text=True,
                              timeout=60, cwd=ROOT)

    help_text = hub("--help").stdout
    for option in ("--username", "--password-file", "--ca-file", "--cert-file", "--key-file"):
        assert option in help_text, option
    pw = tmp_path / "hub.pw"
    pw.write_text("other\n")
    twice = hub("--broker", f"mqtt://hub:{SECRET}@127.0.0.1:1", "--password-file", str(pw))
    assert twice.returncode == 2 and "edgekit hub --password-file: the password is given twice" in twice.stderr
    assert SECRET not in twice.stdout + twice.stderr
    bad = hub("--broker", f"mqtt://hub:{SECRET}@127.0.0.1:nope")
    assert bad.returncode == 2 and "edgekit hub --broker 'mqtt://hub:REDACTED@127.0.0.1:nope'" in bad.stderr
    assert SECRET not in bad.stdout + bad.stderr
    tls_on_plain = hub("--broker", "mqtt://127.0.0.1:1", "--ca-file", str(pw))
    assert tls_on_plain.returncode == 2 and "edgekit hub --ca-file: a TLS file" in tls_on_plain.stderr


# --- real brokers ---------------------------------------------------------------------------------


def _secure_broker(workdir: Path, tls: dict[str, Path], users: dict[str, str] | None = None,
                   require_certificate: bool = False) -> Mosquitto:
    """A mosquitto with one TLS listener; with `users`, anonymous access off and those accounts."""
    if installed() is None:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
    broker = Mosquitto(workdir)
    conf = (f"listener {broker.port} 127.0.0.1\ncafile {tls['ca']}\ncertfile {tls['cert']}\nkeyfile {tls['key']}\n"
            f"require_certificate {str(require_certificate).lower()}\nuser root\nlog_dest stderr\nlog_type error\n")
    if users:
        conf += f"allow_anonymous false\npassword_file {_password_file(workdir / 'passwd', users)}\n"
    else:
        conf += "allow_anonymous true\n"
    broker.conf.write_text(conf)
    return broker


def _gateway(port: int, tls: dict[str, Path], user: str, password: str) -> mqtt.Client:
    """A sensor gateway as a plain paho client: TLS with the CA, its own account."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="gateway")
    client.tls_set(ca_certs=str(tls["ca"]))
    client.username_pw_set(user, password)
    client.connect("127.0.0.1", port)
    client.loop_start()
    return client


@pytest.mark.broker
@pytest.mark.parametrize("broker_of", ["agent", "source"])
def test_the_mqtt_source_reads_over_tls_with_a_ca_file_and_a_password_file(tmp_path: Path, broker_of: str) -> None:
    """Without source.url the source uses the agent's broker and its account and files; with it, its own."""
    tls = _tls_files(tmp_path)
    (tmp_path / "source.pw").write_text(f"{SECRET}\n")
    with _secure_broker(tmp_path / "broker", tls, {"source": SECRET, "gw": "gwpw"}) as broker:
        account = f'username = "source"\npassword_file = "source.pw"\nca_file = "{tls["ca"]}"'
        url = f'url = "mqtts://127.0.0.1:{broker.port}"'
        mqtt_section, source_section = ((f"{url}\n{account}", "") if broker_of == "agent"
                                        else ('url = ""', f"{url}\n{account}"))
        cfg = load_config(_config(tmp_path, mqtt_section, source_section), AgentConfig)
        stop = threading.Event()
        src = open_source(cfg.source, stop=stop, mqtt_url=cfg.mqtt.url, mqtt_security=cfg.mqtt)
        assert SECRET not in repr(vars(src))
        got: list[Sample] = []
        with src:
            assert src.subscribed.wait(10), "the source never subscribed (TLS or account refused?)"
            gateway = _gateway(broker.port, tls, "gw", "gwpw")
            try:
                for t in (1.0, 2.0, 3.0):
                    gateway.publish("sensors/1", orjson.dumps({"t": t, "values": [t, -t]}), qos=1).wait_for_publish(5)
            finally:
                gateway.disconnect()
                gateway.loop_stop()
            threading.Timer(10, stop.set).start()
            for item in src:
                got.append(item)  # type: ignore[arg-type]
                if len(got) == 3:
                    stop.set()
        assert [(s.t_s, s.values.tolist()) for s in got] == [(1.0, [1.0, -1.0]), (2.0, [2.0, -2.0]),
                                                             (3.0, [3.0, -3.0])]


@pytest.mark.broker
def test_the_hub_ingests_over_tls_with_a_ca_file_and_an_account(tmp_path: Path) -> None:
    """`edgekit hub --broker mqtts://... --username --password-file --ca-file`, and a device's transport with
    its own account (password file) and the CA: every result stored."""
    pytest.importorskip("sqlalchemy", reason="the hub extra")
    tls = _tls_files(tmp_path)
    (tmp_path / "hub.pw").write_text("hubpw\n")
    (tmp_path / "edge.pw").write_text("edgepw\n")
    db_url = f"sqlite:///{tmp_path / 'hub.db'}"
    with _secure_broker(tmp_path / "broker", tls, {"hub": "hubpw", "edge-1": "edgepw"}) as broker:
        url = f"mqtts://127.0.0.1:{broker.port}"
        hub = HubCli(tmp_path / "hub.log", url, db_url, "--username", "hub", "--password-file",
                     str(tmp_path / "hub.pw"), "--ca-file", str(tls["ca"]))
        try:
            wait_for(lambda: "hub.connected" in hub.text(), 20, "the hub's TLS connection")
            time.sleep(0.3)  # its SUBACK
            device = MqttSecurity(username="edge-1", password_file=tmp_path / "edge.pw", ca_file=tls["ca"])
            with Transport(url, site="lab", device="edge-1", outbox=tmp_path / "o.db", security=device) as tr:
                tr.send_many([("result", result("edge-1", seq).encode()) for seq in range(1, 6)])
                assert tr.flush(15), tr.stats()
            with HubDB(db_url) as db:
                wait_for(lambda: db.count() == 5, 20, "the five results at the hub")
        finally:
            log = hub.stop()
        assert "hub.connected broker=127.0.0.1" in log and "hubpw" not in log


@pytest.mark.broker
def test_the_transport_presents_a_client_certificate(tmp_path: Path) -> None:
    """A broker with require_certificate: the transport with cert_file and key_file delivers; without, it is
    turned away during the TLS handshake and says so."""
    tls = _tls_files(tmp_path)
    with _secure_broker(tmp_path / "broker", tls, require_certificate=True) as broker:
        url = f"mqtts://127.0.0.1:{broker.port}"
        device = MqttSecurity(ca_file=tls["ca"], cert_file=tls["client_cert"], key_file=tls["client_key"])
        with Transport(url, site="lab", device="edge-1", outbox=tmp_path / "o.db", security=device) as tr:
            tr.send("result", result("edge-1", 1).encode())
            assert tr.flush(15), tr.stats()
        anonymous = MqttSecurity(ca_file=tls["ca"])
        with Transport(url, site="lab", device="edge-1", outbox=tmp_path / "anon.db", security=anonymous,
                       reconnect_max_s=0.5) as tr:
            wait_for(lambda: tr.last_failure is not None, 15, "the refused handshake")
            assert not tr.connected
            # TLS 1.3: the client's handshake is done before the broker checks the certificate, then it hangs up
            assert tr.last_failure.split(":")[0] in ("closed_before_connack", "tls_failed", "reset"), tr.last_failure
