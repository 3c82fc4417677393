"""A random but reproducible cluster workload: VMs writing disk images, live migrations, and
ordinary files being created, written, renamed, truncated and deleted."""

from __future__ import annotations

import random
from dataclasses import dataclass

from ..events import Close, Mkdir, Open, Rmdir, SetAttr, Symlink
from .cluster import Cluster


@dataclass(frozen=True)
class SimConfig:
    """Everything that shapes a simulated run. Same config, same run."""

    seed: int = 0
    hosts: int = 3
    vms: int = 2
    steps: int = 200
    image_size: int = 16384
    max_write: int = 2048
    max_skew_hours: float = 6.0
    defer_rate: float = 0.3  # host copies recorded late, possibly out of gseq order
    overlap_rate: float = 0.5  # migrations where the target opens before the source closes
    file_ops: bool = True
    # delivery to the replica
    max_chunk: int = 8
    duplicate_rate: float = 0.15
    retransmit_rate: float = 0.15
    reorder_within_stream: bool = True
    drain_rate: float = 0.3
    crash_rate: float = 0.0  # chance per applied event that the replica "crashes"


@dataclass
class VM:
    image: str
    host: str
    target: str | None = None  # migrating to
    switch_in: int = 0
    closer: str | None = None  # old host that still has to close
    close_in: int = 0


MODES = (0o644, 0o600, 0o640, 0o755, 0o700, 0o444)
ODD_NAMES = ("é-ü", "caf\udce9", "sp ace", "x.y.z", "-dash")


class Workload:
    def __init__(self, cluster: Cluster, cfg: SimConfig, rng: random.Random) -> None:
        self.c = cluster
        self.cfg = cfg
        self.rng = rng
        self.hosts = list(cluster.hosts)
        self.vms: list[VM] = []
        self.counter = 0

    def defer(self) -> bool:
        return self.rng.random() < self.cfg.defer_rate

    def name(self, parent: str, prefix: str) -> str:
        self.counter += 1
        odd = self.rng.choice(ODD_NAMES) if self.rng.random() < 0.1 else ""
        return f"{parent}/{prefix}{self.counter}{odd}"

    # -- setup -------------------------------------------------------------------------------

    def setup(self) -> None:
        c, rng = self.c, self.rng
        for h in self.hosts:
            c.join(h)
            c.step()
        first = self.hosts[0]
        c.meta(first, Mkdir, path="vms", mode=0o755)
        c.meta(first, Mkdir, path="files", mode=0o755)
        for k in range(self.cfg.vms):
            h = rng.choice(self.hosts)
            image = f"vms/vm{k}.img"
            c.create(h, image, 0o600, defer=self.defer())
            c.meta(h, Open, path=image, defer=self.defer())
            c.truncate(h, image, self.cfg.image_size, defer=self.defer())
            self.vms.append(VM(image, h))

    # -- one step ----------------------------------------------------------------------------

    def step(self) -> None:
        self._progress_migrations()
        actions = [(self.vm_write, 40), (self.migrate, 4), (self.record_pending, 12),
                   (self.tick, 6)]
        if self.cfg.file_ops:
            actions += [(self.file_create, 6), (self.file_write, 8), (self.file_truncate, 3),
                        (self.file_rename, 3), (self.unlink, 3), (self.setattr, 3),
                        (self.mkdir, 3), (self.rmdir, 2), (self.symlink, 2), (self.dir_rename, 1)]
        funcs, weights = zip(*actions, strict=True)
        self.rng.choices(funcs, weights)[0]()
        self.c.step(self.rng.randint(1, 50) * 100_000)

    def _progress_migrations(self) -> None:
        for vm in self.vms:
            if vm.target is not None:
                if vm.switch_in <= 0:
                    vm.closer, vm.close_in = vm.host, self.rng.randint(0, 6)
                    vm.host, vm.target = vm.target, None
                else:
                    vm.switch_in -= 1
            elif vm.closer is not None:
                if vm.close_in <= 0:
                    self.c.meta(vm.closer, Close, path=vm.image, defer=self.defer())
                    vm.closer = None
                else:
                    vm.close_in -= 1

    def vm_write(self) -> None:
        vm = self.rng.choice(self.vms)
        self._write(vm.host, vm.image)

    def _write(self, host: str, path: str) -> None:
        rng = self.rng
        self.c.acquire(host, path, defer=self.defer())
        size = rng.randint(1, self.cfg.max_write)
        offset = rng.randrange(0, self.cfg.image_size)
        self.c.write(host, path, offset, rng.randbytes(size))

    def migrate(self) -> None:
        vm = self.rng.choice(self.vms)
        if vm.target is not None or vm.closer is not None or len(self.hosts) < 2:
            return
        dest = self.rng.choice([h for h in self.hosts if h != vm.host])
        if self.rng.random() < self.cfg.overlap_rate:
            # the destination opens the image while the source still runs and writes
            self.c.meta(dest, Open, path=vm.image, defer=self.defer())
            vm.target, vm.switch_in = dest, self.rng.randint(0, 6)
        else:
            self.c.meta(vm.host, Close, path=vm.image, defer=self.defer())
            self.c.meta(dest, Open, path=vm.image, defer=self.defer())
            vm.host = dest

    def record_pending(self) -> None:
        host = self.rng.choice(self.hosts)
        self.c.record_pending(host, self.rng.randrange(1000))

    def tick(self) -> None:
        self.c.tick(self.rng.choice(self.hosts))

    # -- ordinary files ----------------------------------------------------------------------

    def _files(self) -> list[str]:
        return sorted(p for p in self.c.volume.files() if p.startswith("files/"))

    def _dirs(self) -> list[str]:
        return sorted(p for p in self.c.volume.dirs() if p == "files" or p.startswith("files/"))

    def _host(self) -> str:
        return self.rng.choice(self.hosts)

    def file_create(self) -> None:
        path = self.name(self.rng.choice(self._dirs()), "f")
        host = self._host()
        self.c.create(host, path, self.rng.choice(MODES), defer=self.defer())
        if self.rng.random() < 0.7:
            self.c.write(host, path, 0, self.rng.randbytes(self.rng.randint(1, self.cfg.max_write)))

    def file_write(self) -> None:
        files = self._files()
        if files:
            self._write(self._host(), self.rng.choice(files))

    def file_truncate(self) -> None:
        files = self._files()
        if files:
            size = self.rng.randint(0, 2 * self.cfg.max_write)
            self.c.truncate(self._host(), self.rng.choice(files), size, defer=self.defer())

    def file_rename(self) -> None:
        files = self._files()
        if not files:
            return
        src = self.rng.choice(files)
        others = [f for f in files if f != src]
        if others and self.rng.random() < 0.3:
            dst = self.rng.choice(others)  # replaces an existing file
        else:
            dst = self.name(self.rng.choice(self._dirs()), "r")
        self.c.rename(self._host(), src, dst, defer=self.defer())

    def unlink(self) -> None:
        v = self.c.volume
        paths = sorted(p for p in v.entries if p.startswith("files/") and v.kind(p) in ("f", "l"))
        if paths:
            self.c.unlink(self._host(), self.rng.choice(paths), defer=self.defer())

    def setattr(self) -> None:
        v = self.c.volume
        paths = sorted(p for p in v.entries if v.kind(p) in ("f", "d"))
        path = self.rng.choice(paths)
        mode = self.rng.choice(MODES) if v.kind(path) == "f" else self.rng.choice((0o755, 0o700, 0o750))
        mtime = self.c.wall(None) if self.rng.random() < 0.5 else None
        self.c.meta(self._host(), SetAttr, path=path, mode=mode, mtime_ns=mtime, defer=self.defer())

    def mkdir(self) -> None:
        path = self.name(self.rng.choice(self._dirs()), "d")
        self.c.meta(self._host(), Mkdir, path=path, mode=self.rng.choice((0o755, 0o700, 0o750)),
                    defer=self.defer())

    def rmdir(self) -> None:
        empty = [d for d in self._dirs() if d != "files" and not self.c.volume.children(d)]
        if empty:
            self.c.meta(self._host(), Rmdir, path=self.rng.choice(empty), defer=self.defer())

    def symlink(self) -> None:
        path = self.name(self.rng.choice(self._dirs()), "l")
        target = self.rng.choice(("../escape", "/etc/passwd", "f1", "a/b/c"))
        self.c.meta(self._host(), Symlink, path=path, target=target, defer=self.defer())

    def dir_rename(self) -> None:
        dirs = [d for d in self._dirs() if d != "files"]
        if not dirs:
            return
        src = self.rng.choice(dirs)
        parents = [d for d in self._dirs() if d != src and not d.startswith(src + "/")]
        dst = self.name(self.rng.choice(parents), "m")
        self.c.rename(self._host(), src, dst, defer=self.defer())


def generate(cfg: SimConfig) -> Cluster:
    """Run the workload of ``cfg`` on a simulated cluster and return it (truth and streams)."""
    rng = random.Random(cfg.seed)
    hosts = [f"h{i + 1}" for i in range(cfg.hosts)]
    skews = {h: rng.uniform(-cfg.max_skew_hours, cfg.max_skew_hours) for h in hosts}
    cluster = Cluster(hosts, skews, coordinator_skew_hours=rng.uniform(-1, 1) * cfg.max_skew_hours)
    work = Workload(cluster, cfg, rng)
    work.setup()
    for _ in range(cfg.steps):
        work.step()
    cluster.finish()
    return cluster
