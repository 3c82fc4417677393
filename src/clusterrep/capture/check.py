"""Is FUSE usable here? Say precisely what is missing and how to install it."""

from __future__ import annotations

import ctypes
import os
import shutil

from ..errors import ClusterrepError

INSTALL = "apt-get install -y fuse3 libfuse3-dev && python3 -m pip install mfusepy"


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
    try:
        ctypes.CDLL(os.environ.get("FUSE_LIBRARY_PATH", "libfuse3.so.3"))
    except OSError as exc:
        raise FuseUnavailable(f"libfuse 3 cannot be loaded: {exc}") from None
    try:
        import mfusepy  # noqa: F401
    except ImportError as exc:
        raise FuseUnavailable(f"the Python FUSE binding mfusepy is missing: {exc}") from None


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
