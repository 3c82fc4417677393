"""FUSE capture: the kernel protocol spoken directly on /dev/fuse (no libfuse binding), the
inode table, and the capture file system. See `fs`."""
