"""A whole cluster with TLS on (``clusterrep certs`` certificates, every connection encrypted and
authenticated both ways), its nodes shipping through a fault-injecting proxy that records what
crosses the link. Data written through the mount never appears in clear on the wire; a TLS
record damaged or cut on the way is refused and resent; the replica ends identical with every
event applied once; the CLI status tools need the TLS options too."""

from __future__ import annotations

import logging
import os
import random
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from proxy import start_behind_proxy
from test_crashes import Writers, assert_applied_exactly_once

from clusterrep.capture.check import check_fuse
from clusterrep.errors import AuthError
from clusterrep.localcluster import LocalCluster

log = logging.getLogger("faults")
MARKER = b"clusterrep-plaintext-marker-7f3a9c"


def cli(c: LocalCluster, *args: str, tls: bool = True) -> subprocess.CompletedProcess[str]:
    assert c.pki is not None
    extra = ["--tls-cert", str(c.pki / "cli.pem"), "--tls-key", str(c.pki / "cli.key"),
             "--tls-ca", str(c.pki / "ca.pem")] if tls else []
    return subprocess.run([sys.executable, "-m", "clusterrep", *args, "--replica", c.replica_addr,
                           "--token-file", str(c.token_file), *extra],
                          capture_output=True, text=True, timeout=120)


def test_tls_cluster_through_a_damaging_link(tmp_path: Path, identical) -> None:
    check_fuse()
    seed = int(os.environ.get("CLUSTERREP_SEED", random.randrange(1 << 30)))
    log.warning("seed %d", seed)
    rng = random.Random(seed)
    c = LocalCluster(tmp_path / "c", ("h1", "h2"), tls=True)
    proxy = start_behind_proxy(c, seed)
    proxy.record = True  # what the nodes send from here on, the marker file included
    try:
        with Writers(c, seed):
            secret = c.mount("h1") / "secret.bin"
            secret.write_bytes(MARKER * 20_000)  # ~680 KB of a pattern that must not leak
            for fault in ["flip", "reset", "flip", "reset"]:
                time.sleep(rng.uniform(0.2, 0.6))
                proxy.set(fault)
            time.sleep(0.5)
        identical(c)
        assert proxy.faults == 4
        assert len(proxy.recorded) > 680_000, "the nodes' traffic must have gone through the proxy"
        assert MARKER not in bytes(proxy.recorded), "event data crossed the link in clear"
        replica_log = (c.logs / "replica.log").read_text()
        assert "TLS failure" in replica_log or "closed the connection in the middle" in replica_log

        status = cli(c, "status")
        assert status.returncode == 0, status.stderr
        assert "replica: gseq" in status.stdout
        rows = {line.split()[0]: line.split()[1] for line in status.stdout.splitlines()[2:]
                if line and line.split()[0] in ("h1", "h2", "coordinator")}
        assert rows == {"h1": "tls", "h2": "tls", "coordinator": "tls"}, status.stdout
        plain = cli(c, "status", tls=False)
        assert plain.returncode == AuthError.exit_code
        assert "requires TLS" in plain.stderr and "--tls-cert" in plain.stderr
        waited = cli(c, "wait", "--timeout", "60")
        assert waited.returncode == 0, waited.stderr

        assert_applied_exactly_once(c, seed)
    finally:
        c.stop()
        proxy.close()
