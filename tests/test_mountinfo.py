"""One reading of a mountinfo line, for the content-hash cache and the FUSE lookups alike.

The cache trusts a file's times only on the filesystems it names (:class:`.hashcache.Mounts`),
the FUSE lookups find the mounts a dump or a writer may wait on (:mod:`.mountinfo`): a line the
one reads differently from the other would make a mount trusted by one and unseen by the other.
The tenant names its mount points (and a FUSE server its subtype); the kernel escapes them.
The last tests: which FUSE mounts a writer on its way to a volume's directory may wait on.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from corevault.capture import hashcache, mountinfo

LINES = [
    b"22 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda rw",
    # a mount point named to look like the separator and another line's fields once unescaped
    b"40 22 0:52 / /data/a\\040-\\040fuse.x\\0400:9 rw,nosuid shared:7 master:2 - fuse.s3fs\\040x s3fs rw",
    b"41 22 0:53 / /mnt/m rw - tmpfs tmpfs rw",
    b"42 22 0:54 / /mnt/cut rw,relatime shared:9",  # cut short before its " - "
    b"43 22 0:55",  # cut shorter
    b"",
]


def test_the_hash_cache_and_the_fuse_lookups_read_each_line_alike(tmp_path: Path) -> None:
    path = tmp_path / "mountinfo"
    path.write_bytes(b"\n".join(LINES) + b"\n")
    mounts = hashcache.Mounts(path=str(path)).load()
    parsed = [p for line in LINES if (p := mountinfo.parse(line)) is not None]
    assert {ident: (dev, kind) for ident, dev, _, kind in parsed} == mounts.mounts
    assert [ident for ident, *_ in parsed] == [b"22", b"40", b"41"]  # a line cut short is no mount
    assert mounts.mount(40) == (b"0:52", b"fuse.s3fs\\040x") and mounts.mount(42) is None
    assert mounts.fs_type(0 << 8 | 52) == "fuse.s3fs\\040x" and not mounts.has_device(b"0:54")
    fuse = mountinfo.fuse_mounts(mountinfo.lines(str(path)))
    assert fuse == {b"0:52": b"/data/a\\040-\\040fuse.x\\0400:9"}
    assert mountinfo.unescape(fuse[b"0:52"]) == b"/data/a - fuse.x 0:9"


def test_mountinfo_needs_nothing_of_corevault_and_every_order_of_import_works() -> None:
    """The hash cache reads mountinfo through :mod:`.mountinfo`, which the crash path's modules
    import in every order: one importing another that imports the first would break on a
    half-made module (or, as before, keep a second parse to avoid it)."""
    probe = (
        "import sys\n"
        "import corevault.capture.{first}\n"
        "import corevault.capture.buildid, corevault.capture.hashcache, corevault.capture.mountinfo\n"
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('corevault'))))\n"
    )
    for first in ("mountinfo", "hashcache", "buildid"):
        done = subprocess.run(
            [sys.executable, "-I", "-c", probe.format(first=first)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 0, done.stderr
    alone = subprocess.run(
        [sys.executable, "-I", "-c", "import sys, corevault.capture.mountinfo\nprint(*sorted(sys.modules))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert [m for m in alone if m.startswith("corevault")] == [
        "corevault",
        "corevault.capture",
        "corevault.capture.mountinfo",
    ]


#: a pod's mountinfo: its own FUSE mount over the directory its core pattern names
ON_THE_WAY = [
    b"20 1 0:30 / / rw,relatime - overlay overlay rw",
    b"21 20 0:31 / /data/dump-a rw,relatime - tmpfs tmpfs rw",
    b"22 21 0:40 / /data/dump-a/own rw,relatime - fuse.fusehang fusehang rw,user_id=0,group_id=0",
    b"23 20 0:41 / /data/other rw,relatime - fuse.sshfs sshfs rw",
]


def test_the_mount_the_writer_holds_is_named_when_it_is_a_fuse_one() -> None:
    assert mountinfo.fuse_on_the_way(ON_THE_WAY, "/data/dump-a/own/x", 22) == {b"0:40": b"/data/dump-a/own"}
    assert mountinfo.fuse_on_the_way(ON_THE_WAY, "/data/dump-a", 21) == {}  # listed, and no FUSE one


def test_a_mount_no_line_lists_is_told_apart_from_one_that_is_not_fuse() -> None:
    """Unmounted lazily while the writer held it: its device is what names it then."""
    assert mountinfo.fuse_on_the_way(ON_THE_WAY, "/data/dump-a/own", 99) is None


def test_before_the_walk_holds_anything_every_fuse_mount_at_or_above_the_directory() -> None:
    assert mountinfo.fuse_on_the_way(ON_THE_WAY, "/data/dump-a/own/sub", None) == {
        b"0:40": b"/data/dump-a/own"
    }
    assert mountinfo.fuse_on_the_way(ON_THE_WAY, "/data/dump-a", None) == {}
