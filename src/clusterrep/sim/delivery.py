"""Delivery of streams to the replica as a bad network would do it: in pieces, late, out of
order across and (optionally) within streams, with duplicates and retransmitted ranges."""

from __future__ import annotations

import random

from ..events import Event


def deliver(streams: dict[str, list[Event]], rng: random.Random, *, max_chunk: int = 8,
            duplicate_rate: float = 0.15, retransmit_rate: float = 0.15,
            reorder_within_stream: bool = True) -> list[list[Event]]:
    """Cut every stream into chunks, add duplicates and retransmits, and interleave them."""
    per_stream: list[list[list[Event]]] = []
    for name in sorted(streams):
        events = streams[name]
        chunks: list[list[Event]] = []
        i = 0
        while i < len(events):
            n = rng.randint(1, max_chunk)
            chunks.append(events[i:i + n])
            i += n
        extras: list[list[Event]] = []
        for chunk in chunks:
            if rng.random() < duplicate_rate:
                extras.append(list(chunk))
            if rng.random() < retransmit_rate:
                a = rng.randrange(len(events))
                extras.append(events[a:a + rng.randint(1, 3 * max_chunk)])
        for extra in extras:
            chunks.insert(rng.randint(0, len(chunks)), extra)
        per_stream.append(chunks)
    if reorder_within_stream:
        flat = [chunk for chunks in per_stream for chunk in chunks]
        rng.shuffle(flat)
        return flat
    # keep each stream's order, interleave the streams at random
    out: list[list[Event]] = []
    queues = [list(reversed(chunks)) for chunks in per_stream if chunks]
    while queues:
        q = rng.choice(queues)
        out.append(q.pop())
        if not q:
            queues.remove(q)
    return out
