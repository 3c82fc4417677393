"""Error types. Each says what happened, carries an exit code, and a hint for the user.

Only the CLI turns these into exit codes; library code raises them with context.
"""

from __future__ import annotations


class ClusterrepError(Exception):
    """Base of every error clusterrep raises on purpose."""

    exit_code = 2
    hint = ""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        if hint is not None:
            self.hint = hint

    def __str__(self) -> str:
        text = super().__str__()
        return f"{text} (hint: {self.hint})" if self.hint else text


class InvalidEvent(ClusterrepError, ValueError):
    """An event that violates the model: bad field, bad size, bad path."""

    exit_code = 3
    hint = "the sender produced a malformed event; nothing was applied"


class UnsafePath(InvalidEvent):
    """A path that is absolute, not normalised, contains NUL or '..', or is too long."""

    hint = "paths on the wire must be relative to the volume root, normalised, without '..'"


class DecodeError(InvalidEvent):
    """Bytes that are not a valid encoded event (wrong version, truncated, wrong types)."""

    hint = "the peer speaks another protocol version or the data is corrupt; nothing was applied"


class ConflictingCopies(ClusterrepError):
    """Two copies of one event (same source and seq, or same gseq) that differ."""

    exit_code = 4
    hint = "two senders disagree about one event; the replica stopped before applying it"


class StampViolation(ClusterrepError):
    """A node's stream breaks the stamping rules (an 'after' that goes backwards)."""

    exit_code = 4
    hint = "the node's stream is inconsistent; the replica stopped before applying it"


class ApplyError(ClusterrepError):
    """The target directory refused an event (it differs from what the volume had).

    ``errno`` is the operating system's reason, for callers that must answer with one (the
    coordinator executing a node's request).
    """

    exit_code = 5
    hint = "the target diverged from the volume; run 'clusterrep verify' and resynchronise"

    def __init__(self, message: str, *, hint: str | None = None, errno: int = 5) -> None:
        super().__init__(message, hint=hint)
        self.errno = errno


class TargetEscape(ApplyError):
    """Applying a path would leave the target directory (a symlink or non-directory in the way)."""

    def __init__(self, message: str, *, hint: str | None = None, errno: int = 40) -> None:
        super().__init__(message, hint=hint, errno=errno)  # 40: ELOOP

    hint = "a symlink or file under the target stands where a directory must be; nothing was changed"


class CheckpointError(ClusterrepError):
    """The checkpoint file is unreadable or does not match this target."""

    exit_code = 6
    hint = "the state directory is damaged or belongs to another target"


class SimulatedCrash(Exception):
    """Raised by fault injection in tests to stop a component at a chosen point."""
