"""Is FUSE usable here? Say precisely what is missing and how to install it."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess

from ..errors import ClusterrepError

INSTALL = "apt-get install -y fuse3"


class FuseUnavailable(ClusterrepError):
    """FUSE cannot be used on this machine."""

    exit_code = 2
    hint = f"install FUSE 3 ({INSTALL}) and run as root or a user allowed to mount"


def check_fuse() -> None:
    if not os.path.exists("/dev/fuse"):
        raise FuseUnavailable("/dev/fuse does not exist (the fuse kernel module is not loaded, "
                              "or this container was started without it)")
    if shutil.which("fusermount3") is None:
        raise FuseUnavailable("fusermount3 is not installed")


def check_allow_other(fuse_conf: str = "/etc/fuse.conf") -> None:
    """``allow_other`` is refused by fusermount3 to a user other than root unless
    ``user_allow_other`` is in /etc/fuse.conf: say so before mounting."""
    if os.geteuid() == 0:
        return
    try:
        with open(fuse_conf) as f:
            lines = [line.split("#", 1)[0].strip() for line in f]
    except OSError:
        lines = []
    if "user_allow_other" not in lines:
        raise ClusterrepError(
            "--allow-other needs root, or 'user_allow_other' in /etc/fuse.conf",
            hint="add a line 'user_allow_other' to /etc/fuse.conf, or run the node as root")


def mounted_here(mount: str) -> str | None:
    """The source name of the file system mounted at ``mount`` per /proc/mounts (even a dead
    FUSE mount, which ``os.path.ismount`` does not see), or None."""
    real = os.path.realpath(mount)
    try:
        with open("/proc/mounts") as fh:
            for line in fh:
                parts = line.split()
                if len(parts) >= 3 and parts[1].replace("\\040", " ") == real:
                    return parts[0]
    except OSError:
        pass
    return None


def clear_dead_mount(mount: str) -> bool:
    """Lazily unmount a dead clusterrep mount left by a crashed node agent; True if one was."""
    try:
        os.stat(mount)
        return False
    except OSError as exc:
        if exc.errno != errno.ENOTCONN:
            return False
    if mounted_here(mount) != "clusterrep":
        raise ClusterrepError(f"{mount} is a dead FUSE mount of another program",
                              hint=f"unmount it: fusermount3 -u -z {mount}")
    subprocess.run(["fusermount3", "-u", "-z", mount], check=False, capture_output=True)
    return True


def check_mountpoint(mount: str, volume: str) -> None:
    real_mount, real_volume = os.path.realpath(mount), os.path.realpath(volume)
    if real_mount == real_volume or real_mount.startswith(real_volume + os.sep):
        raise ClusterrepError(f"mount point {mount} lies inside the volume {volume}",
                              hint="mount the capture file system somewhere else")
    if os.path.ismount(mount):
        raise ClusterrepError(f"{mount} is already a mount point",
                              hint=f"is another node agent running there? unmount it with: "
                                   f"fusermount3 -u {mount}")
    if os.path.isdir(mount) and os.listdir(mount):
        raise ClusterrepError(f"mount point {mount} is not empty",
                              hint="use an empty directory: files in it would be hidden")
