"""Which device profile fits this machine: a pure function of a filesystem root (tests pass a fake /proc).

Reads only files under `root` (proc/sys/kernel/arch, proc/cpuinfo, proc/device-tree/model and the paths
profiles name); runs no commands and nothing at import time. Must not import onnxruntime or torch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from edgekit.devices.profile import PROFILES_DIR, Profile, describe, list_profiles
from edgekit.errors import DeviceError

__all__ = ["Facts", "describe", "detect", "matches", "probe"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Facts:
    """What detection looked at."""

    machine: str  # "x86_64", "aarch64", ... or "" when unknown
    model: str  # /proc/device-tree/model without its trailing NUL, or ""
    cpuinfo: str


def _read(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8", "replace")
    except OSError:
        return ""


def _machine_from_cpuinfo(cpuinfo: str) -> str:
    """Architecture from /proc/cpuinfo when /proc/sys/kernel/arch (Linux >= 6.1) is absent."""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip().lower(), value.strip())
    if "vendor_id" in fields or "flags" in fields:
        return "x86_64" if " lm " in f" {fields.get('flags', '')} " else "i686"
    arch = fields.get("cpu architecture", "")
    if arch == "8" or "asimd" in fields.get("features", "").split():
        return "aarch64"
    if arch.startswith("7"):
        return "armv7l"
    return ""


def probe(root: Path = Path("/")) -> Facts:
    """Read the facts detection uses from under `root`."""
    cpuinfo = _read(root / "proc" / "cpuinfo")
    machine = _read(root / "proc" / "sys" / "kernel" / "arch").strip() or _machine_from_cpuinfo(cpuinfo)
    model = _read(root / "proc" / "device-tree" / "model").replace("\x00", "").strip()
    return Facts(machine=machine, model=model, cpuinfo=cpuinfo)


def matches(profile: Profile, facts: Facts, root: Path) -> bool:
    """True when every non-empty rule of the profile holds for these facts."""
    rules = profile.match
    if rules.machine and facts.machine not in rules.machine:
        return False
    if rules.device_tree_model and not any(s in facts.model for s in rules.device_tree_model):
        return False
    if rules.files and not any((root / f.lstrip("/")).exists() for f in rules.files):
        return False
    if rules.cpuinfo and not any(s in facts.cpuinfo for s in rules.cpuinfo):
        return False
    return rules.specificity > 0


def detect(root: Path = Path("/"), profiles_dir: Path = PROFILES_DIR) -> Profile:
    """The most specific profile whose match rules hold under `root`; DeviceError when none does."""
    facts = probe(root)
    found = [p for p in list_profiles(profiles_dir) if matches(p, facts, root)]
    if not found:
        raise DeviceError(
            f"no device profile matches (machine={facts.machine or 'unknown'!r}, model={facts.model!r})",
            where=str(root), hint="set runtime.profile to one of `edgekit device list`, or add a profile",
        )
    best = max(found, key=lambda p: (p.match.specificity, p.name))
    log.info("device_detect profile=%s machine=%s model=%r candidates=%s", best.name, facts.machine,
             facts.model, ",".join(p.name for p in found))
    return best
