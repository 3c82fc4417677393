"""FUSE capture. mfusepy must load libfuse 3 (once libfuse 2 is installed, e.g. by bindfs, it
would otherwise pick it silently and get 4 KiB requests), so the library is pinned here, before
mfusepy is imported."""

import os

os.environ.setdefault("FUSE_LIBRARY_PATH", "libfuse3.so.3")
