"""A node's requests to the coordinator, answered: one small function per operation.

`answer` is the coordinator's whole request protocol (docs/protocol.md, "Node ↔ coordinator")
without the network: the server calls it for every request it receives, and tests call it
in-process. It raises `OpFailed` (with the errno for the node), `InvalidLock` or
`ReclaimConflict`; the caller turns them into error answers.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Any

from ..errors import OpFailed, UnsafePath
from ..events import check_path, encode
from .locking import LockRequest
from .service import CoordinatorService

Request = dict[str, Any]
Op = Callable[[CoordinatorService, str, str, Request], dict[str, Any]]


def answer(svc: CoordinatorService, node: str, msg: Request) -> dict[str, Any]:
    """Answer one request of ``node`` (a map with ``op`` and, but for ping/renew, ``op_id``).
    Every answer says which coordinator process answered (``coord``) and the node's ``epoch``:
    a node that sees either change drops its write tokens (and, for a new epoch, its locks)."""
    theirs = msg.get("generation")
    if isinstance(theirs, str) and theirs != svc.generation:
        raise OpFailed(f"node {node} belongs to cluster generation {theirs}, this coordinator runs "
                       f"generation {svc.generation} (the volume was failed over or restored): it "
                       "is refused. To bring this host into this cluster, stop it, remove its state "
                       "directory (--state) and start it again", errno.EPERM)
    reply = _answer(svc, node, msg)
    return {**reply, "coord": svc.incarnation, "epoch": svc.epoch(node), "generation": svc.generation}


def _answer(svc: CoordinatorService, node: str, msg: Request) -> dict[str, Any]:
    if node in svc.evicted:
        raise OpFailed(f"node {node} was evicted from the cluster (at gseq {svc.evicted[node]}): "
                       "it is refused. To bring this host back, stop it, remove its state directory "
                       "(--state) and start it with a new --id", errno.EPERM)
    svc.renew(node)  # any request shows the node alive
    op = msg.get("op")
    if op in ("ping", "renew"):
        return {"gseq": svc.gseq, "lease": svc.lease}
    op_id = msg.get("op_id", "")
    if not isinstance(op_id, str) or not op_id:
        raise OpFailed("every request but ping and renew needs an op_id", errno.EINVAL)
    run = OPS.get(op) if isinstance(op, str) else None
    if run is None:
        raise OpFailed(f"unknown op {op!r}", errno.EINVAL)
    if op not in ("join", "leave") and node not in svc.members:
        raise OpFailed(f"node {node} has not joined", errno.EPERM)
    # op_ids are the node's own: a node cannot see or replay another node's operations
    return svc.once(f"{node}/{op_id}", lambda: run(svc, node, op_id, msg))


def _join(svc: CoordinatorService, node: str, op_id: str, msg: Request) -> dict[str, Any]:
    incarnation = msg.get("incarnation")
    ev = svc.join(node, op_id, incarnation if isinstance(incarnation, str) else None)
    return {"gseq": svc.gseq, "event": None if ev is None else encode(ev), "lease": svc.lease}


def _leave(svc: CoordinatorService, node: str, op_id: str, msg: Request) -> dict[str, Any]:
    ev = svc.leave(node, op_id)
    return {"gseq": svc.gseq, "event": None if ev is None else encode(ev)}


def _file(msg: Request, op: str) -> tuple[int, str]:
    ino, path = msg.get("ino"), msg.get("path")
    if not isinstance(ino, int) or not isinstance(path, str):
        raise OpFailed(f"{op} needs ino and path", errno.EINVAL)
    try:
        check_path(path)
    except UnsafePath as exc:
        raise OpFailed(str(exc), errno.EINVAL) from None
    return ino, path


def _acquire(svc: CoordinatorService, node: str, op_id: str, msg: Request) -> dict[str, Any]:
    return svc.acquire(node, op_id, *_file(msg, "acquire"))


def _where(svc: CoordinatorService, node: str, op_id: str, msg: Request) -> dict[str, Any]:
    return {"gseq": svc.gseq, "path": svc.where(*_file(msg, "where"))}


def _lock(svc: CoordinatorService, node: str, op_id: str, msg: Request) -> dict[str, Any]:
    return svc.file_lock(node, op_id, LockRequest.parse(msg))


def _reclaim(svc: CoordinatorService, node: str, op_id: str, msg: Request) -> dict[str, Any]:
    records = msg.get("locks")
    if not isinstance(records, list):
        raise OpFailed("reclaim needs a list of locks", errno.EINVAL)
    return svc.reclaim(node, records, msg.get("epoch"))


def _meta(svc: CoordinatorService, node: str, op_id: str, msg: Request) -> dict[str, Any]:
    fields = msg.get("fields")
    if not isinstance(fields, dict) or not isinstance(msg.get("kind"), str):
        raise OpFailed("meta needs kind and fields", errno.EINVAL)
    return svc.execute(node, msg["kind"], op_id, dict(fields))


OPS: dict[str, Op] = {"join": _join, "leave": _leave, "acquire": _acquire, "where": _where,
                      "lock": _lock, "reclaim": _reclaim, "meta": _meta}
