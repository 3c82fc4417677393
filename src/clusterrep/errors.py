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


class ConfigError(ClusterrepError):
    """A setting that cannot work: a malformed address, a missing or weak token file."""

    exit_code = 2
    hint = "check the command line options and the files they name"


class AddressError(ConfigError, ValueError):
    """An address that is not HOST:PORT, [IPv6]:PORT or :PORT."""

    hint = "write addresses as HOST:PORT, [IPv6]:PORT, or :PORT for all interfaces"


class WireError(ClusterrepError):
    """A connection between clusterrep processes could not be made, was refused, or broke."""

    exit_code = 7
    hint = "check that the peer is running and reachable at that address"


class ListenError(WireError):
    """A server could not bind or listen on its address."""

    hint = "choose another address or port, or stop the process that holds it"


class AuthError(WireError):
    """The handshake failed: a peer without the token, or one that does not speak the protocol."""

    hint = "check that both sides use the same --token-file"


class FrameError(WireError):
    """A frame that is oversized, tampered with, replayed, out of order or not valid msgpack."""

    hint = ("the connection was closed and nothing of the frame was used; the peer reconnects "
            "and resends. If it repeats, check the network path and that both sides run the "
            "same clusterrep version")


class PeerClosed(WireError):
    """The peer closed the connection (or it was closed locally) or the link broke."""

    hint = "the peer went away or was stopped; reconnecting resends what was not acknowledged"


class JournalError(ClusterrepError):
    """The journal (a node's spool or the replica's journal) cannot do what was asked."""

    exit_code = 8
    hint = "check the state directory's file system; reopening the journal recovers what is on disk"


class JournalCorrupt(JournalError):
    """A journal record before the journal's tail fails its checksum, or segments are missing."""

    hint = "the journal is damaged before its tail; restore it or start a new state directory"


class JournalLocked(JournalError):
    """Another process (or another open in this one) already uses this journal directory."""

    hint = "stop the other clusterrep process using this state directory, or give this one its own"


class JournalFull(JournalError):
    """An append failed for lack of space (ENOSPC, EDQUOT); nothing of it was kept."""

    hint = "free space on the journal's file system; the journal is unchanged and the append can be retried"


class JournalTrimmed(JournalError):
    """A read asked for records that were trimmed because they were no longer needed."""

    hint = "those records were delivered and trimmed; resume from the journal's first index"


class RecordTooLarge(JournalError, ValueError):
    """A record bigger than the journal accepts (64 MiB)."""

    hint = "split the data into smaller records"


class InvalidLock(ClusterrepError, ValueError):
    """A lock request or record that is malformed: bad range, type, owner, inode or field."""

    exit_code = 3
    hint = "the sender produced a malformed lock request; nothing was changed"


class ReclaimConflict(ClusterrepError):
    """A reclaimed lock conflicts with one already held (the table was left unchanged)."""

    exit_code = 4
    hint = ("two nodes claim incompatible locks; the coordinator lost or mixed up lock state, "
            "and no reclaimed lock was installed")


class OpFailed(ClusterrepError):
    """A node's request failed; ``errno`` goes back to the node (and to the application)."""

    def __init__(self, message: str, errno: int) -> None:
        super().__init__(message)
        self.errno = errno


class VolumeNotEmpty(ClusterrepError):
    """The volume holds files but the replica was never synchronised with it."""

    exit_code = 2


class HistoryError(ClusterrepError):
    """The replica's history (restore points) cannot do what was asked, or is damaged."""

    hint = ("the live target is unaffected; `clusterrep marks` lists the restore points there are, "
            "and the replica's log says what happened to the history")


class MarkNotRestorable(HistoryError):
    """A restore point that is not in the replica's history window (or a pin that is unknown)."""

    exit_code = 1
    hint = "pick a mark inside the window `clusterrep marks` lists"
