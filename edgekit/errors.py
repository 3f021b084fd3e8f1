"""The exception tree. Library code raises these; only the CLI maps them to exit codes and prints.

    EdgekitError            every error edgekit raises on purpose; .hint says what to do
    ├── ConfigError         a config, recipe or flag is wrong (names file and key)
    ├── DataError           a dataset, sample or message is unusable (names file, row, column, field)
    │   ├── IdentityError   a message that does not belong to the topic it came on (site, device, id)
    │   └── NotScored       a trial its features cannot be computed on (.reason: no_walk, no_turn, ...)
    ├── DeviceError         a device profile or execution provider problem
    ├── ModelError          a bundle, manifest, ONNX file or signature problem
    ├── TransportError      the broker or network (names the endpoint)
    └── ExportError         training/export/quantization/parity failed
"""

from __future__ import annotations


class EdgekitError(Exception):
    """Base class. `where` names the file, key, topic or endpoint; `hint` what to do about it."""

    def __init__(self, message: str, *, where: str | None = None, hint: str | None = None) -> None:
        self.message = message
        self.where = where
        self.hint = hint
        super().__init__(str(self))

    def __str__(self) -> str:
        text = f"{self.where}: {self.message}" if self.where else self.message
        if self.hint:
            text += f" ({self.hint})"
        return text


class ConfigError(EdgekitError):
    """A config file, recipe or command-line value is invalid."""


class DataError(EdgekitError):
    """A dataset file, column or sample is missing or unusable."""


class IdentityError(DataError):
    """A message names another site or device than its topic, or an id that is not its device's own."""


class NotScored(DataError):
    """A trial whose features cannot be computed (too short, no walk, no U-turn): reported, not scored.
    `reason` is a short code for the report (e.g. 'no_walk'); the message says it in words."""

    def __init__(self, message: str, *, reason: str, where: str | None = None, hint: str | None = None) -> None:
        self.reason = reason
        super().__init__(message, where=where, hint=hint)


class DeviceError(EdgekitError):
    """A device profile is invalid, or an execution provider cannot be used."""


class ModelError(EdgekitError):
    """A bundle, manifest, model file or signature is missing, altered or inconsistent."""


class TransportError(EdgekitError):
    """The MQTT broker refused us or could not be reached."""


class ExportError(EdgekitError):
    """Training, export, quantization or a parity check failed."""
