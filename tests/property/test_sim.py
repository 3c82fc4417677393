"""Property tests: the real merger and applier, driven by the cluster simulator.

Each example generates a cluster workload (VMs writing images, live migrations with and without
overlap, file churn, clock skews of hours, out-of-order node copies), delivers its streams out of
order with duplicates and retransmits, and feeds the real merger and applier. `run` checks at
every mark that the target is the state of a consistent cut, and at the end that the target is
byte-identical to the volume; it raises `SimFailure` otherwise.

Profiles: ``HYPOTHESIS_PROFILE=ci`` (default, 200 examples) or ``soak`` (5000).
"""

from __future__ import annotations

import dataclasses
import tempfile

from hypothesis import given, settings
from hypothesis import strategies as st

from clusterrep.sim import SimConfig, generate, run
from clusterrep.sim.volume import read_tree

configs = st.builds(
    SimConfig,
    seed=st.integers(0, 2**32),
    hosts=st.integers(1, 4),
    vms=st.integers(1, 3),
    steps=st.integers(10, 120),
    image_size=st.sampled_from([4096, 16384]),
    max_write=st.sampled_from([64, 1024, 3000]),
    max_skew_hours=st.floats(0, 12),
    defer_rate=st.sampled_from([0.0, 0.3, 0.8]),
    overlap_rate=st.sampled_from([0.0, 0.5, 1.0]),
    file_ops=st.booleans(),
    max_chunk=st.integers(1, 16),
    duplicate_rate=st.sampled_from([0.0, 0.2, 0.6]),
    retransmit_rate=st.sampled_from([0.0, 0.2, 0.6]),
    reorder_within_stream=st.booleans(),
    drain_rate=st.sampled_from([0.05, 0.3, 1.0]),
    crash_rate=st.sampled_from([0.0, 0.0, 0.02, 0.1]),
)


@given(configs)
def test_replica_is_identical_and_every_mark_is_a_consistent_cut(cfg: SimConfig) -> None:
    with tempfile.TemporaryDirectory() as work:
        report = run(cfg, work, check_marks=True)
    assert report.identical
    assert report.marks_checked > 0


@settings(max_examples=60)
@given(configs, st.floats(-24, 24), st.floats(-24, 24))
def test_clock_skew_changes_nothing(cfg: SimConfig, skew_a: float, skew_b: float) -> None:
    """Same workload and delivery, different clocks: the same merged order and tree."""
    cfg = dataclasses.replace(cfg, crash_rate=0.0)
    results = []
    for hours in (0.0, abs(skew_a), abs(skew_b)):
        skewed = dataclasses.replace(cfg, max_skew_hours=hours)
        with tempfile.TemporaryDirectory() as work:
            report = run(skewed, work, check_marks=False)
            results.append((report.order, read_tree(f"{work}/target")))
    walls = {ev.wall for evs in generate(cfg).streams.values() for ev in evs}
    assert walls  # the streams do carry clocks; they just must not matter
    assert results[0] == results[1] == results[2]


@settings(max_examples=60)
@given(configs)
def test_duplicated_and_retransmitted_streams_change_nothing(cfg: SimConfig) -> None:
    trees = []
    for dup in (0.0, 1.0):
        noisy = dataclasses.replace(cfg, duplicate_rate=dup, retransmit_rate=dup, crash_rate=0.0)
        with tempfile.TemporaryDirectory() as work:
            report = run(noisy, work, check_marks=False)
            trees.append(read_tree(f"{work}/target"))
            if dup:
                assert report.duplicates > 0
    assert trees[0] == trees[1]


@settings(max_examples=100)
@given(configs)
def test_restore_at_random_marks_equals_the_volume_at_that_mark(cfg: SimConfig) -> None:
    """With history kept (and pruned at random points, and the replica crashing), restoring
    random marks of the window gives the tree the target held right after each, which `run`
    checked to be the volume at that mark's consistent cut."""
    with tempfile.TemporaryDirectory() as work:
        report = run(cfg, work, check_marks=True, history=True)
    assert report.identical
    assert report.restores_checked > 0
