"""Device profiles: one TOML file per device in profiles/, one schema (`Profile`), loaded and listed here.

A profile says which onnxruntime execution providers to try (in order), how many threads to use and
what the device can sustain. Reads only the profile files; must not import onnxruntime, paho or torch.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from pathlib import Path

from pydantic import Field, field_validator

from edgekit.config import Strict, load_toml, validate
from edgekit.errors import ConfigError, DeviceError

PROFILES_DIR = Path(__file__).resolve().parent / "profiles"
CPU = "CPUExecutionProvider"


class MatchRules(Strict):
    """How `detect` recognises the device. Every non-empty rule must hold; within a rule, any entry."""

    machine: list[str] = Field(
        default_factory=list,
        description="CPU architectures (as `uname -m` prints them: x86_64, aarch64), from "
                    "/proc/sys/kernel/arch or guessed from /proc/cpuinfo.",
    )
    device_tree_model: list[str] = Field(
        default_factory=list, description="Substrings of /proc/device-tree/model (e.g. 'Raspberry Pi 5')."
    )
    files: list[str] = Field(
        default_factory=list,
        description="Paths relative to the filesystem root of which at least one must exist "
                    "(e.g. 'etc/nv_tegra_release').",
    )
    cpuinfo: list[str] = Field(default_factory=list, description="Substrings of /proc/cpuinfo.")

    @property
    def specificity(self) -> int:
        """How many rules this profile checks; the most specific matching profile wins."""
        return sum(bool(r) for r in (self.machine, self.device_tree_model, self.files, self.cpuinfo))


class Limits(Strict):
    """What the device is expected to sustain; the agent warns when a config asks for more."""

    memory_mib: int = Field(gt=0, description="Resident memory the agent may use, MiB.")
    max_window_rate_hz: float = Field(
        gt=0, description="Windows per second one agent process can be expected to score (an estimate "
                          "until measured with the bench on the device).",
    )
    max_model_mib: float = Field(gt=0, description="Largest bundle model file worth loading, MiB.")


class Profile(Strict):
    """One device: how to recognise it and how to run models on it."""

    name: str = Field(description="Profile name; equals the file's stem (runtime.profile selects it).")
    description: str = Field(description="One line naming the hardware.")
    match: MatchRules = Field(description="Detection rules (see MatchRules).")
    providers: list[str] = Field(
        min_length=1,
        description="onnxruntime execution providers in preference order; CPUExecutionProvider last.",
    )
    intra_op_threads: int = Field(ge=1, description="onnxruntime intra-op threads for single-window inference.")
    inter_op_threads: int = Field(ge=1, description="onnxruntime inter-op threads.")
    limits: Limits = Field(description="What the device can sustain.")
    notes: str = Field("", description="Where the numbers come from; caveats.")

    @field_validator("providers")
    @classmethod
    def _cpu_last(cls, v: list[str]) -> list[str]:
        if v[-1] != CPU:
            raise ValueError(f"must end with {CPU!r} (got {v!r})")
        if len(set(v)) != len(v):
            raise ValueError(f"must not repeat a provider (got {v!r})")
        return v


def profile_names(directory: Path = PROFILES_DIR) -> list[str]:
    return sorted(p.stem for p in directory.glob("*.toml"))


def load_profile(name: str, directory: Path = PROFILES_DIR) -> Profile:
    """The profile called `name`; DeviceError naming the known ones when there is none."""
    path = directory / f"{name}.toml"
    if "/" in name or not path.is_file():
        known = profile_names(directory)
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"known profiles: {', '.join(known)}"
        raise DeviceError(f"unknown device profile {name!r}", where="runtime.profile", hint=hint)
    try:
        profile = validate(Profile, load_toml(path), str(path))
    except ConfigError as exc:
        raise DeviceError(exc.message, where=exc.where, hint=exc.hint) from None
    if profile.name != name:
        raise DeviceError(f"name {profile.name!r} differs from the file name", where=f"{path}: name",
                          hint=f"set name = {name!r}")
    return profile


def list_profiles(directory: Path = PROFILES_DIR) -> list[Profile]:
    """Every profile in `directory`, sorted by name."""
    return [load_profile(n, directory) for n in profile_names(directory)]


def available_providers(profile: Profile, installed: Sequence[str]) -> list[str]:
    """The profile's providers that onnxruntime reports installed, in the profile's order, CPU last."""
    have = set(installed)
    out = [p for p in profile.providers if p in have and p != CPU]
    return [*out, CPU]


def describe(profile: Profile) -> str:
    """A few human-readable lines (what `edgekit device detect` prints)."""
    lim = profile.limits
    lines = [
        f"{profile.name}: {profile.description}",
        f"  providers: {', '.join(profile.providers)}",
        f"  threads: intra_op={profile.intra_op_threads} inter_op={profile.inter_op_threads}",
        f"  limits: memory={lim.memory_mib} MiB, windows<={lim.max_window_rate_hz:g}/s, "
        f"model<={lim.max_model_mib:g} MiB",
    ]
    if profile.notes:
        lines.append(f"  notes: {profile.notes.strip()}")
    return "\n".join(lines)
