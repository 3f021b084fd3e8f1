"""Device profiles and detection, against fake filesystem roots under tmp_path and this machine."""

from __future__ import annotations

import platform
from pathlib import Path

import onnxruntime as ort
import pytest

from edgekit.devices.detect import describe, detect, probe
from edgekit.devices.profile import (
    CPU,
    PROFILES_DIR,
    available_providers,
    list_profiles,
    load_profile,
    profile_names,
)
from edgekit.errors import DeviceError

X86_CPUINFO = "processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu vme de pse tsc lm avx2\n"
ARM_CPUINFO = ("processor\t: 0\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\n"
               "CPU implementer\t: 0x41\nCPU architecture: 8\nCPU part\t: 0xd08\n")


def fake_root(tmp_path: Path, *, cpuinfo: str, model: str | None = None, arch: str | None = None,
              tegra: str | None = None) -> Path:
    root = tmp_path / "root"
    (root / "proc").mkdir(parents=True)
    (root / "proc" / "cpuinfo").write_text(cpuinfo)
    if arch is not None:
        (root / "proc" / "sys" / "kernel").mkdir(parents=True)
        (root / "proc" / "sys" / "kernel" / "arch").write_text(arch + "\n")
    if model is not None:
        (root / "proc" / "device-tree").mkdir(parents=True)
        (root / "proc" / "device-tree" / "model").write_bytes(model.encode() + b"\x00")
    if tegra is not None:
        (root / "etc").mkdir(parents=True)
        (root / "etc" / "nv_tegra_release").write_text(tegra)
    return root


CASES = [
    ("generic-x86_64", dict(cpuinfo=X86_CPUINFO)),
    ("generic-x86_64", dict(cpuinfo="", arch="x86_64")),
    ("raspberry-pi-4", dict(cpuinfo=ARM_CPUINFO, model="Raspberry Pi 4 Model B Rev 1.4")),
    ("raspberry-pi-4", dict(cpuinfo=ARM_CPUINFO, model="Raspberry Pi Compute Module 4 Rev 1.0", arch="aarch64")),
    ("raspberry-pi-5", dict(cpuinfo=ARM_CPUINFO, model="Raspberry Pi 5 Model B Rev 1.0")),
    ("jetson-nano", dict(cpuinfo=ARM_CPUINFO, model="NVIDIA Jetson Nano Developer Kit",
                         tegra="# R32 (release), REVISION: 7.4, GCID: 33514132, BOARD: t210ref\n")),
    ("jetson-orin-nano", dict(cpuinfo=ARM_CPUINFO, model="NVIDIA Jetson Orin Nano Developer Kit",
                              tegra="# R36 (release), REVISION: 3.0, GCID: 36923193, BOARD: generic\n")),
    ("generic-aarch64", dict(cpuinfo=ARM_CPUINFO, model="Pine64 RockPro64 v2.1")),
    # a Jetson model string without L4T installed is not treated as a Jetson
    ("generic-aarch64", dict(cpuinfo=ARM_CPUINFO, model="NVIDIA Jetson Nano Developer Kit")),
]


@pytest.mark.parametrize(("expected", "tree"), CASES, ids=[f"{e}-{i}" for i, (e, _) in enumerate(CASES)])
def test_detect_fake_roots(tmp_path: Path, expected: str, tree: dict) -> None:
    assert detect(fake_root(tmp_path, **tree)).name == expected


def test_detect_32bit_pi_os_is_refused_with_a_hint(tmp_path: Path) -> None:
    cpuinfo = ARM_CPUINFO.replace("CPU architecture: 8", "CPU architecture: 7").replace("asimd", "neon")
    root = fake_root(tmp_path, cpuinfo=cpuinfo, model="Raspberry Pi 4 Model B Rev 1.4")
    assert probe(root).machine == "armv7l"
    with pytest.raises(DeviceError, match="no device profile matches") as err:
        detect(root)
    assert "runtime.profile" in (err.value.hint or "")


@pytest.mark.skipif(platform.machine() != "x86_64", reason="this check knows what an x86_64 host is")
def test_detect_this_machine_is_generic_x86_64() -> None:
    assert detect().name == "generic-x86_64"


def test_every_profile_loads_and_is_described() -> None:
    names = profile_names()
    assert {"generic-x86_64", "raspberry-pi-4", "raspberry-pi-5", "jetson-nano", "jetson-orin-nano"} <= set(names)
    for profile in list_profiles():
        assert profile.providers[-1] == CPU
        assert profile.match.specificity >= 1
        text = describe(profile)
        assert text.splitlines()[0].startswith(f"{profile.name}: ")
        assert ", ".join(profile.providers) in text


def test_available_providers_keeps_order_and_ends_with_cpu() -> None:
    nano = load_profile("jetson-nano")
    assert available_providers(nano, ["CPUExecutionProvider"]) == [CPU]
    assert available_providers(nano, ["CPUExecutionProvider", "CUDAExecutionProvider",
                                      "TensorrtExecutionProvider"]) == [
        "TensorrtExecutionProvider", "CUDAExecutionProvider", CPU]
    # what this machine's onnxruntime really reports
    assert available_providers(load_profile("generic-x86_64"), ort.get_available_providers()) == [CPU]
    assert available_providers(nano, []) == [CPU]


def test_unknown_profile_suggests_the_close_one() -> None:
    with pytest.raises(DeviceError, match="unknown device profile") as err:
        load_profile("raspberry-pi5")
    assert "raspberry-pi-5" in (err.value.hint or "")


def test_bad_profile_file_names_file_and_key(tmp_path: Path) -> None:
    good = (PROFILES_DIR / "raspberry-pi-5.toml").read_text()
    (tmp_path / "raspberry-pi-5.toml").write_text(good.replace("intra_op_threads", "intra_threads"))
    with pytest.raises(DeviceError) as err:
        load_profile("raspberry-pi-5", tmp_path)
    assert "raspberry-pi-5.toml: intra_threads: unknown key, did you mean 'intra_op_threads'?" in str(err.value)
    (tmp_path / "raspberry-pi-5.toml").write_text(
        good.replace('providers = ["CPUExecutionProvider"]', 'providers = ["CPUExecutionProvider", "X"]'))
    with pytest.raises(DeviceError, match="must end with 'CPUExecutionProvider'"):
        load_profile("raspberry-pi-5", tmp_path)
