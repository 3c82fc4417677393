"""`clusterrep sim` and `clusterrep demo`: run the cluster simulator against the real engine."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import asdict

from ..sim import SimConfig, SimFailure, run

DEMO_INTRO = """\
clusterrep demo: a simulated cluster driving the real replica engine.

  hosts h1..hN run VMs whose disk images live on one shared volume; the VMs live-migrate
  between hosts (sometimes the new host opens the image before the old one closes it), other
  files are created, written, renamed, truncated and deleted, and every host's clock is off by
  up to {skew:g} hours. The replica receives each host's stream and the coordinator's stream out
  of order, duplicated and retransmitted, merges them by time marks (never by clocks), applies
  them to a real directory, and crashes and restarts from its checkpoint now and then.
  At every mark the replica is checked to be a consistent cut; at the end, byte for byte.
"""


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    for name in ("sim",):
        p = sub.add_parser(
            name,
            help="run a simulated cluster through the real merger and applier" if name == "sim"
            else "show clusterrep at work on a simulated cluster (a real-process demo follows)",
            description=__doc__ if name == "sim" else DEMO_INTRO.format(skew=6),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument("--seed", type=int, default=1, help="random seed; same seed, same run (default 1)")
        p.add_argument("--runs", type=int, default=1,
                       help="run this many seeds, from --seed upwards (a soak test; default 1)")
        p.add_argument("--hosts", type=int, default=3, help="number of hosts (default 3)")
        p.add_argument("--vms", type=int, default=2, help="VMs, one disk image each (default 2)")
        p.add_argument("--steps", type=int, default=400 if name == "demo" else 200,
                       help="workload steps per run")
        p.add_argument("--skew-hours", type=float, default=6.0,
                       help="largest clock skew of a host, either way (default 6)")
        p.add_argument("--crash-rate", type=float, default=0.01,
                       help="chance per applied event that the replica crashes (default 0.01)")
        p.add_argument("--no-file-ops", action="store_true", help="only VM images, no other files")
        p.add_argument("--no-marks", action="store_true",
                       help="skip the consistent-cut check at every mark (faster)")
        p.add_argument("--workdir", help="where to put the replica's target and state "
                       "(default: a temp dir, removed afterwards)")
        p.add_argument("--json", action="store_true", help="print one JSON object per run")
        p.set_defaults(func=main, demo=name == "demo")


def main(args: argparse.Namespace) -> int:
    if args.runs < 1 or args.hosts < 1 or args.vms < 1 or args.steps < 0:
        print("clusterrep: error: --runs, --hosts and --vms must be at least 1", file=sys.stderr)
        return 2
    if args.demo and not args.json:
        print(DEMO_INTRO.format(skew=args.skew_hours))
    failures = 0
    started = time.perf_counter()
    for i in range(args.runs):
        cfg = SimConfig(seed=args.seed + i, hosts=args.hosts, vms=args.vms, steps=args.steps,
                        max_skew_hours=args.skew_hours, crash_rate=args.crash_rate,
                        file_ops=not args.no_file_ops)
        workdir = args.workdir or tempfile.mkdtemp(prefix="clusterrep-sim-")
        try:
            report = run(cfg, workdir, check_marks=not args.no_marks)
        except SimFailure as exc:
            failures += 1
            print(f"seed {cfg.seed}: FAILED: {exc}", file=sys.stderr)
            print(f"  reproduce: clusterrep sim --seed {cfg.seed} --hosts {cfg.hosts} --vms {cfg.vms} "
                  f"--steps {cfg.steps} --skew-hours {cfg.max_skew_hours:g} "
                  f"--crash-rate {cfg.crash_rate:g} --workdir DIR", file=sys.stderr)
            continue
        finally:
            if not args.workdir:
                shutil.rmtree(workdir, ignore_errors=True)
        if args.json:
            out = {k: v for k, v in asdict(report).items() if k != "order"}
            print(json.dumps(out))
        elif args.runs == 1:
            print(report.summary())
        else:
            print(f"seed {cfg.seed}: identical, {report.events} events, {report.marks_checked} marks, "
                  f"{report.crashes} crashes ({report.seconds:.2f} s)")
    if args.runs > 1 and not args.json:
        print(f"{args.runs} runs, {failures} failed, {time.perf_counter() - started:.1f} s")
    return 1 if failures else 0
