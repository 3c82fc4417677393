"""Link faults between the nodes and the replica, through a fault-injecting proxy: the link goes
down under load, frames are corrupted, cut mid-frame and duplicated. The replica refuses what is
damaged, the nodes resend, and it ends identical with every event applied exactly once."""

from __future__ import annotations

import logging
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from proxy import start_behind_proxy
from test_crashes import Writers, assert_applied_exactly_once

from clusterrep.localcluster import LocalCluster

log = logging.getLogger("faults")


def test_link_faults_under_load(tmp_path, identical) -> None:
    seed = int(os.environ.get("CLUSTERREP_SEED", random.randrange(1 << 30)))
    down = float(os.environ.get("CLUSTERREP_LINK_DOWN_SECONDS", "5"))
    log.warning("seed %d, link down %g s", seed, down)
    rng = random.Random(seed)
    c = LocalCluster(tmp_path / "c", ("h1", "h2"))
    proxy = start_behind_proxy(c, seed)
    try:
        with Writers(c, seed):
            time.sleep(0.5)
            proxy.set("down")  # the replica's link is cut under load ...
            time.sleep(down)
            proxy.set("pass")  # ... and comes back
            for fault in ["flip", "reset", "duplicate", "flip", "reset", "duplicate"]:
                time.sleep(rng.uniform(0.2, 0.8))
                proxy.set(fault)
            proxy.set("pass", delay=0.01)
            time.sleep(0.5)
            proxy.set("pass")
        identical(c)
        log_text = (c.logs / "replica.log").read_text()
        assert "integrity" in log_text or "frame" in log_text.lower()  # damage was refused
        assert_applied_exactly_once(c, seed)
    finally:
        c.stop()
        proxy.close()
