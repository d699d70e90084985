"""Typed errors. Jobs turn each into one clear message and a non-zero exit code."""
from __future__ import annotations


class MlopsError(Exception):
    """Base class: a user-facing error whose message is complete without a traceback."""

    exit_code = 2


class ConfigError(MlopsError):
    """The composed config is invalid (unknown key, wrong type, out of range, impossible mix)."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid config ({len(self.problems)} problem(s)):\n{lines}")


class DataValidationError(MlopsError):
    """A dataset violates its declared schema; lists every violation at once."""

    exit_code = 3

    def __init__(self, dataset: str, violations: list[str]):
        self.dataset, self.violations = dataset, list(violations)
        lines = "\n".join(f"  - {v}" for v in self.violations)
        super().__init__(f"dataset '{dataset}' failed validation "
                         f"({len(self.violations)} violation(s)):\n{lines}")


class StorageError(MlopsError):
    """A storage URI cannot be resolved, read or written."""


class RunNotFound(MlopsError):
    """A run, study or checkpoint URI given by the user does not exist."""


class TrainingFailed(MlopsError):
    """Ray Train ran out of retries; the message names the last error and where checkpoints are."""

    exit_code = 4


class GateFailed(MlopsError):
    """The candidate failed validation gates; the message names them and shows the verdict table."""

    exit_code = 5

    def __init__(self, failed: list[str], table: str = ""):
        self.failed, self.table = list(failed), table
        super().__init__(f"{len(self.failed)} gate(s) failed: {', '.join(self.failed)}"
                         + (f"\n{table}" if table else ""))


class RegistryError(MlopsError):
    """A registry operation cannot be done (unknown model/version/alias, immutable version...)."""

    exit_code = 6


class RegistryConflict(RegistryError):
    """A compare-and-swap lost: the alias moved since it was read. Re-read and decide again."""

    exit_code = 8


class ArtifactCorrupted(RegistryError):
    """A registered artifact does not match its recorded content hash (edited or damaged)."""


class PermissionDenied(MlopsError):
    """The caller's role does not allow the action (the denial itself is audited)."""

    exit_code = 7
