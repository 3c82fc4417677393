"""The FUSE protocol layouts against the sizes the kernel ABI fixes (linux/fuse.h)."""

from __future__ import annotations

import os

import pytest

from clusterrep.capture import kernel as k


@pytest.mark.parametrize(("layout", "size"), [
    (k.IN_HEADER, 40), (k.OUT_HEADER, 16), (k.INIT_OUT, 64), (k.ATTR, 88), (k.ENTRY_OUT, 40),
    (k.ATTR_OUT, 16), (k.GETATTR_IN, 16), (k.SETATTR_IN, 88), (k.MKNOD_IN, 16), (k.MKDIR_IN, 8),
    (k.RENAME2_IN, 16), (k.OPEN_IN, 8), (k.CREATE_IN, 16), (k.OPEN_OUT, 16), (k.RELEASE_IN, 24),
    (k.FLUSH_IN, 24), (k.READ_IN, 40), (k.WRITE_IN, 40), (k.WRITE_OUT, 8), (k.STATFS_OUT, 80),
    (k.FSYNC_IN, 16), (k.LK_IN, 48), (k.LK_OUT, 24), (k.FALLOCATE_IN, 32), (k.LSEEK_IN, 24),
    (k.DIRENT, 24), (k.NOTIFY_INVAL_INODE_OUT, 24), (k.BATCH_FORGET_IN, 8), (k.FORGET_ONE, 16),
])
def test_layouts_have_the_kernels_sizes(layout, size) -> None:
    assert layout.size == size


def test_an_entry_reply_is_the_kernels_128_bytes_and_says_cache_nothing() -> None:
    st = os.stat("/")
    raw = k.pack_entry(7, st)
    assert len(raw) == 128
    nodeid, _generation, entry_valid, attr_valid, env_ns, attr_ns = k.ENTRY_OUT.unpack_from(raw)
    assert (nodeid, entry_valid, attr_valid, env_ns, attr_ns) == (7, 0, 0, 0, 0)
    attr = k.ATTR.unpack_from(raw, k.ENTRY_OUT.size)
    assert attr[0] == st.st_ino and attr[9] == st.st_mode
    assert attr[4] * 10**9 + attr[7] == st.st_mtime_ns  # seconds and nanoseconds apart


def test_dirents_are_padded_to_eight_bytes_and_keep_any_name_bytes() -> None:
    for name in (b"a", b"abcdefgh", b"\xff\xfe not utf-8"):
        rec = k.pack_dirent(5, 3, name, 8)
        assert len(rec) % 8 == 0
        ino, off, namelen, dtype = k.DIRENT.unpack_from(rec)
        assert (ino, off, dtype) == (5, 3, 8)
        assert rec[k.DIRENT.size:k.DIRENT.size + namelen] == name


def test_names_split_nul_terminated_names_and_refuse_an_unterminated_one() -> None:
    assert k.names(memoryview(b"old\0new\0"), 2) == [b"old", b"new"]
    with pytest.raises(ValueError, match="NUL-terminated"):
        k.names(memoryview(b"old\0new"), 2)


def test_a_short_request_is_refused_not_misread() -> None:
    with pytest.raises(ValueError, match="shorter than its header"):
        k.header(memoryview(b"\0" * 39))
