"""Every typed error and its exit code. Jobs turn each into one clear message on stderr and
that code (`user_errors`); library code raises them and never exits.

    0 ok · 2 config, missing file, storage · 3 data · 4 training failed · 5 gate failed ·
    6 registry · 7 denied · 8 lost a compare-and-swap · 9 audit chain broken ·
    10 Serve deployment / canary / smoke test · 11 Jobs API · 12 export refused ·
    130 a remote job stopped by Ctrl-C
"""
from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any


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


class UnsafeArtifact(RegistryError):
    """A checkpoint, run record or registry version asks for something an artifact may not: a
    model builder outside the allowlist, code to run, a report whose signature does not verify
    (an artifact is data, never code)."""


class PermissionDenied(MlopsError):
    """The caller's role does not allow the action (the denial itself is audited)."""

    exit_code = 7


class InputInvalid(DataValidationError):
    """Batch-scoring input that does not match the model (survives pickling: read tasks raise
    it on Ray workers)."""

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.dataset, self.violations)


class RequestInvalid(MlopsError):
    """A request does not match the model's input signature (HTTP 4xx). At most MAX problems
    are kept (the last one says how many more there were): an answer never grows with the
    request (no amplification)."""

    MAX = 20

    def __init__(self, problems: list[str], status: int = 422):
        problems = list(problems)
        if len(problems) > self.MAX:  # the last problem (e.g. the allowed fields) is kept
            problems = problems[:self.MAX - 2] + [
                f"... and {len(problems) - self.MAX + 1} more problem(s)", problems[-1]]
        self.problems, self.status = problems, status
        super().__init__("; ".join(problems))


class ServeError(MlopsError):
    """A Serve application failed to deploy, or a rollout was rolled back."""

    exit_code = 10


class SmokeFailed(MlopsError):
    """The live endpoint did not answer held-out rows as the registry version does."""

    exit_code = 10


class SubmissionError(MlopsError):
    """The Jobs API refused the job or could not be reached."""

    exit_code = 11


class ExportError(MlopsError):
    """A bundle cannot be built, or failed its own checks (onnx.checker, parity with the served
    model); nothing was written."""

    exit_code = 12


class ClusterError(MlopsError):
    """The warm local Ray could not be started (`ray start --head` failed)."""

    exit_code = 13


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn typed errors into one message on stderr and the error's exit code (no traceback)."""
    try:
        yield
    except MlopsError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(e.exit_code)
