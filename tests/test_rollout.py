"""The device's side of a model rollout (issue 16, edgekit/rollout.py), without a broker: a bundle command's
bundle fetched from a small HTTP server with the device's token, checked (archive, signature, input contract,
on-device parity), swapped in, watched against its band, kept or rolled back; a version that failed is not
tried again; a restart during a watch rolls back. And the archive both sides share (edgekit/contract/archive.py).
"""

from __future__ import annotations

import io
import tarfile
import time
from pathlib import Path

import pytest
from rolloutfactory import BundleServer, command, variant

from edgekit.contract import archive
from edgekit.contract.messages import BundleCommand
from edgekit.errors import DataError
from edgekit.manifest import keygen, load_bundle
from edgekit.rollout import (
    CURRENT,
    PREVIOUS,
    BundleStore,
    Counts,
    RolloutControl,
    band_verdict,
    contract_changes,
    start_bundle,
)

pytestmark = [pytest.mark.torch]


@pytest.fixture(scope="module")
def key(tmp_path_factory) -> tuple[Path, Path]:
    return keygen(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def bundles(stream_bundle, key, tmp_path_factory) -> dict[str, Path]:
    """v1 (the stream bundle, signed), v2 (another training: another data fingerprint), and v2's broken kinds."""
    root = tmp_path_factory.mktemp("variants")
    private, _public = key
    v1 = variant(stream_bundle, root / "v1", private)
    v2 = {("data_fingerprint",): "2" * 64}
    return {
        "v1": v1,
        "v2": variant(v1, root / "v2", private, changes=v2),
        "parity": variant(v1, root / "parity", private, changes=v2, heldout="wrong"),
        "contract": variant(v1, root / "contract", private, changes={**v2, ("input", "window_hop"): 64}),
        "tampered": variant(v1, root / "tampered", private, changes=v2,
                            tamper={("thresholds", "min_confidence"): 0.0}),
        "unsigned": variant(v1, root / "unsigned", None, changes={("data_fingerprint",): "3" * 64}),
    }


class Device:
    """A RolloutControl as the agent wires it, with stand-ins for the agent's models (`prepare`, `swap`)."""

    def __init__(self, store_dir: Path, running: Path, public_key: Path | None, ca_file: Path | None = None) -> None:
        self.swaps: list[Path] = []
        self.store = BundleStore(store_dir)
        self.control = RolloutControl(
            self.store, running, load_bundle(running, public_key=public_key), configured=running,
            public_key=public_key, ca_file=ca_file, timeout_s=10.0, max_bytes=archive.MAX_BYTES,
            prepare=lambda path, manifest: ("models of", path), on_change=lambda: None)

    def swap(self, loaded: tuple[str, Path], path: Path) -> tuple[str, Path]:
        self.swaps.append(path)
        return ("models of", self.swaps[-2] if len(self.swaps) > 1 else Path("v1"))

    def send(self, cmd: BundleCommand) -> None:
        self.sent_at = time.time()
        self.control.command(cmd.encode(), "topic 'edgekit/v1/s/d/command/bundle'")

    def settle(self, timeout_s: float = 30.0) -> str:
        """Wait until the worker has a bundle ready or ended its work on the last command; the state then."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            status = self.control.status()
            done = status.state in ("healthy", "rolled_back", "refused", "failed") and status.since >= self.sent_at
            if self.control.due(time.monotonic()) or done:
                return status.state
            time.sleep(0.02)
        raise AssertionError(f"still {self.control.status()} after {timeout_s} s")

    def step(self, counts: Counts) -> None:
        self.control.step(time.monotonic(), counts, self.swap)


@pytest.fixture
def device(bundles, key, tmp_path):
    d = Device(tmp_path / "store", bundles["v1"], key[1])
    yield d
    d.control.close()


def test_a_new_bundle_is_fetched_checked_swapped_watched_and_kept(device, bundles):
    with BundleServer() as server:
        cmd, server.archives["d-1"] = command(bundles["v2"], f"{server.url}/bundles/d-1", watch_s=0.2)
        device.send(cmd)
        assert device.settle() == "checking"  # checked, waiting for the agent's loop
    v1, v2 = archive.bundle_version(bundles["v1"]), cmd.version
    device.step(Counts(100, 5, 0, 12800))
    status = device.control.status()
    assert (status.state, status.running, status.previous, status.target) == ("watching", v2, v1, v2)
    assert device.swaps == [device.store.path(v2)]
    assert device.store.link(CURRENT) == v2 and device.store.link(PREVIOUS) == v1
    assert (device.store.path(v1) / "manifest.json").is_file()  # the old bundle is kept in the store
    device.step(Counts(110, 6, 0, 14080))  # the watch is not over: nothing happens
    assert device.control.status().state == "watching"
    time.sleep(0.25)
    assert device.control.due(time.monotonic())
    device.step(Counts(110, 6, 0, 14080))  # 10 windows since the swap, one deferred: inside [0, 1]
    status = device.control.status()
    assert (status.state, status.running, status.previous, status.deployment) == ("healthy", v2, v1, "d-1")
    assert sorted(p.name for p in device.store.root.iterdir()) == sorted([v1, v2, CURRENT, PREVIOUS, "rollout.json"])
    # The broker resends the retained command after a reconnect: nothing is fetched again.
    device.send(cmd)
    assert device.settle() == "healthy" and device.swaps == [device.store.path(v2)]


def test_a_bundle_whose_rates_leave_the_band_is_rolled_back_and_not_tried_again(device, bundles):
    with BundleServer() as server:
        cmd, server.archives["d-1"] = command(bundles["v2"], f"{server.url}/bundles/d-1", watch_s=0.0,
                                              min_windows=10, deferral_band=(0.0, 0.5))
        device.send(cmd)
        assert device.settle() == "checking"
        device.step(Counts(0, 0, 0, 0))
        device.step(Counts(5, 5, 0, 640))  # fewer than min_windows: the watch goes on
        assert device.control.status().state == "watching"
        time.sleep(1.05)
        device.step(Counts(20, 14, 0, 2560))
        status = device.control.status()
        v1 = archive.bundle_version(bundles["v1"])
        assert (status.state, status.running, status.target) == ("rolled_back", v1, cmd.version)
        assert "deferral rate 0.700 outside the band [0, 0.5] over 20 windows" in (status.reason or "")
        assert device.swaps[-1] == device.store.path(v1) and device.store.link(CURRENT) == v1
        fetched = len(server.requests)
        device.send(cmd)  # the same version again: remembered, not fetched
        assert device.settle() == "rolled_back" and len(server.requests) == fetched
        assert device.control.status().reason.startswith("not tried again: deferral rate 0.700")


@pytest.mark.parametrize(("name", "state", "words"), [
    ("parity", "rolled_back", "failed on-device parity: "),
    ("tampered", "refused", "signature does not match manifest.json"),
    ("unsigned", "refused", "manifest.sig is missing"),
    ("contract", "refused", "its input contract differs from the running bundle's: window_hop 128 -> 64"),
])
def test_a_bundle_that_fails_a_check_is_never_swapped_in(device, bundles, name, state, words):
    with BundleServer() as server:
        cmd, server.archives["d-1"] = command(bundles[name], f"{server.url}/bundles/d-1")
        device.send(cmd)
        assert device.settle() == state
        assert words in (device.control.status().reason or "")
        assert device.swaps == [] and device.store.link(CURRENT) is None
        assert not device.store.path(cmd.version).exists()
        device.send(cmd)
        assert device.settle() == "rolled_back" and "not tried again" in device.control.status().reason


def test_a_wrong_token_or_archive_fails_this_command_only(device, bundles):
    with BundleServer(token="right" * 4) as server:
        cmd, server.archives["d-1"] = command(bundles["v2"], f"{server.url}/bundles/d-1", token="wrong" * 4)
        device.send(cmd)
        assert device.settle() == "failed" and "HTTP 403" in device.control.status().reason
        bad = BundleCommand(**{**_fields(cmd), "token": "right" * 4, "sha256": "0" * 64})
        device.send(bad)
        assert device.settle() == "refused" and "the download is not the command's bundle" in \
            device.control.status().reason
        good = BundleCommand(**{**_fields(cmd), "token": "right" * 4})
        device.send(good)
        assert device.settle() == "checking"  # neither failure was remembered against the version


def test_an_https_hub_is_trusted_through_the_configured_ca_only(device, bundles, key, tmp_path):
    from test_transport import _tls_files

    (tmp_path / "tls").mkdir()
    tls = _tls_files(tmp_path / "tls")
    with BundleServer(tls=(tls["cert"], tls["key"])) as server:
        cmd, server.archives["d-1"] = command(bundles["v2"], f"{server.url}/bundles/d-1")
        device.send(cmd)  # the system's CAs do not know the test's CA: retried, said in the status
        deadline = time.monotonic() + 20
        while "CERTIFICATE_VERIFY_FAILED" not in (device.control.status().reason or ""):
            assert time.monotonic() < deadline, device.control.status()
            time.sleep(0.05)
        assert device.control.status().state == "fetching" and server.requests == []
        trusting = Device(tmp_path / "store-2", bundles["v1"], key[1], ca_file=tls["ca"])
        try:
            trusting.send(cmd)
            assert trusting.settle() == "checking"
        finally:
            trusting.control.close()


def test_a_withdrawn_command_drops_the_work_not_yet_swapped_in(device, bundles):
    cmd, _ = command(bundles["v2"], "http://127.0.0.1:1/bundles/d-1")  # nothing listens: fetching, retried
    device.send(cmd)
    deadline = time.monotonic() + 20
    while "cannot fetch the bundle" not in (device.control.status().reason or ""):
        assert time.monotonic() < deadline, device.control.status()
        time.sleep(0.05)
    device.sent_at = time.time()
    device.control.command(b"", "topic 'edgekit/v1/s/d/command/bundle'")  # the hub cleared it: the rollout stopped
    while device.control.status().state != "idle":
        assert time.monotonic() < deadline, device.control.status()
        time.sleep(0.05)
    assert device.control.status().reason == "the hub withdrew the bundle command before it ran"
    assert device.swaps == [] and cmd.version not in device.store.read()["refused"]


def test_a_restart_while_watching_rolls_back(device, bundles, key, tmp_path):
    with BundleServer() as server:
        cmd, server.archives["d-1"] = command(bundles["v2"], f"{server.url}/bundles/d-1", watch_s=60)
        device.send(cmd)
        assert device.settle() == "checking"
        device.step(Counts(0, 0, 0, 0))
    assert device.control.status().state == "watching"
    device.control.close()  # the agent dies here
    store = BundleStore(tmp_path / "store")
    v1 = archive.bundle_version(bundles["v1"])
    assert start_bundle(store, bundles["v1"]) == store.path(v1)
    state = store.read()
    assert (state["state"], state["running"], state["refused"][cmd.version]) == (
        "rolled_back", v1, "the agent restarted while the new bundle was watched")
    # A healthy rollout survives restarts: the store's current bundle is what the agent loads.
    again = Device(tmp_path / "store", store.path(v1), key[1])
    assert again.control.status().running == v1
    again.control.close()


def test_the_configured_bundle_wins_when_it_changed(bundles, tmp_path):
    store = BundleStore(tmp_path / "store")
    store.adopt(bundles["v2"], archive.bundle_version(bundles["v2"]))
    store.point(CURRENT, archive.bundle_version(bundles["v2"]))
    store.write({"configured": archive.bundle_version(bundles["v1"]), "running": archive.bundle_version(bundles["v2"])})
    assert start_bundle(store, bundles["v1"]) == store.path(archive.bundle_version(bundles["v2"]))
    assert start_bundle(store, bundles["unsigned"]) == bundles["unsigned"]  # the operator configured another one
    assert store.link(CURRENT) is None


def test_a_config_that_names_the_stores_current_link_follows_it(device, bundles, key, tmp_path):
    """bundle = STORE/current (deploy/systemd/agent.example.toml): what the link names runs, and a rollout
    moving the link is not a changed config."""
    store = device.store
    v1, v2 = archive.bundle_version(bundles["v1"]), archive.bundle_version(bundles["v2"])
    store.adopt(bundles["v1"], v1)
    store.point(CURRENT, v1)
    link = store.root / CURRENT
    assert start_bundle(store, link) == store.path(v1)
    managed = Device(store.root, link, key[1])
    try:
        with BundleServer() as server:
            cmd, server.archives["d-1"] = command(bundles["v2"], f"{server.url}/bundles/d-1", watch_s=0.0)
            managed.send(cmd)
            assert managed.settle() == "checking"
            managed.step(Counts(0, 0, 0, 0))
            time.sleep(0.01)
            managed.step(Counts(10, 0, 0, 1280))
        assert managed.control.status().state == "healthy"
    finally:
        managed.control.close()
    assert start_bundle(store, link) == store.path(v2) and store.link(CURRENT) == v2


def test_contract_changes_and_band_verdict(bundles):
    m1 = load_bundle(bundles["v1"])
    assert contract_changes(m1, load_bundle(bundles["v2"])) == []
    assert contract_changes(m1, load_bundle(bundles["contract"])) == ["window_hop 128 -> 64"]
    cmd, _ = command(bundles["v2"], "http://h/bundles/d", deferral_band=(0.1, 0.5))
    assert band_verdict(cmd, Counts(10, 3, 0, 1280)) is None
    assert "deferral rate 0.000 outside the band [0.1, 0.5]" in band_verdict(cmd, Counts(10, 0, 0, 1280))
    q = BundleCommand(**{**_fields(cmd), "quarantine_band": (0.0, 0.01)})
    assert "quarantine rate 0.020 outside the band [0, 0.01]" in band_verdict(q, Counts(10, 3, 2, 98))


@pytest.mark.broker
def test_refresh_status_publishes_the_retained_status_again(mosquitto, tmp_path):
    """How the hub hears of each rollout state: the transport publishes its retained status anew."""
    from subscriber import Subscriber

    from edgekit.transport import Transport

    extra = {"rollout": {"state": "idle", "running": "a" * 16}}
    sub = Subscriber(mosquitto.port)
    try:
        with Transport(mosquitto.url, site="s", device="d", outbox=tmp_path / "o.db",
                       status_extra=lambda: dict(extra)) as tr:
            assert sub.wait_for(lambda: [m.get("rollout") for m in sub.of("status")] == [extra["rollout"]])
            extra["rollout"] = {"state": "fetching", "running": "a" * 16, "target": "b" * 16}
            tr.refresh_status()
            assert sub.wait_for(lambda: sub.of("status")[-1].get("rollout") == extra["rollout"], 10)
            assert sub.of("status")[-1]["state"] == "online" and len(sub.of("status")) == 2
    finally:
        sub.client.disconnect()
        sub.client.loop_stop()


# --- the archive ---------------------------------------------------------------------------------------------


def test_an_archive_packs_the_same_bytes_and_unpacks_the_same_bundle(bundles, tmp_path):
    blob = archive.pack(bundles["v1"])
    assert blob == archive.pack(bundles["v1"])
    (tmp_path / "a.tar").write_bytes(blob)
    names = archive.unpack(tmp_path / "a.tar", tmp_path / "out")
    v1 = bundles["v1"]
    assert sorted(names) == sorted(p.relative_to(v1).as_posix() for p in v1.rglob("*") if p.is_file())
    assert archive.bundle_version(tmp_path / "out") == archive.bundle_version(bundles["v1"])
    load_bundle(tmp_path / "out")


def _tar(members: list[tuple[str, bytes, bytes]]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, kind, data in members:
            info = tarfile.TarInfo(name)
            info.type = kind
            info.size = len(data) if kind == tarfile.REGTYPE else 0
            if kind == tarfile.SYMTYPE:
                info.linkname = data.decode()
            tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
    return out.getvalue()


@pytest.mark.parametrize(("members", "max_bytes", "words"), [
    ([("manifest.json", tarfile.REGTYPE, b"{}"), ("../evil", tarfile.REGTYPE, b"x")], None, "not a plain relative path"),
    ([("/etc/evil", tarfile.REGTYPE, b"x")], None, "is not a plain relative path"),
    ([("manifest.json", tarfile.SYMTYPE, b"/etc/passwd")], None, "is not a regular file"),
    ([("manifest.json", tarfile.REGTYPE, b"{}"), ("manifest.json", tarfile.REGTYPE, b"{}")], None, "appears twice"),
    ([("model.onnx", tarfile.REGTYPE, b"x")], None, "holds no manifest.json"),
    ([("manifest.json", tarfile.REGTYPE, b"x" * 100)], 10, "more than 256 files or 10 bytes"),
], ids=["dotdot", "absolute", "link", "twice", "no-manifest", "too-big"])
def test_an_archive_that_is_not_a_plain_bundle_is_refused_whole(members, max_bytes, words, tmp_path):
    (tmp_path / "a.tar").write_bytes(_tar(members))
    with pytest.raises(DataError, match=words):
        archive.unpack(tmp_path / "a.tar", tmp_path / "out", max_bytes=max_bytes or archive.MAX_BYTES)
    assert not (tmp_path / "out").exists() and not (tmp_path / "evil").exists()


def _fields(cmd: BundleCommand) -> dict:
    return {k: getattr(cmd, k) for k in BundleCommand.__dataclass_fields__}
