"""The content hash cache of mapped binaries, attacked from real containers.

A crash's binaries are identified by their content; the cache (:mod:`corevault.capture.hashcache`)
spares a crash-looping pod's next crashes from hashing the same files again. A tenant
controls its files: it may rewrite a binary in place and put its size and mtime back, and on
a FUSE volume its server reports any metadata at all; another of its processes may change a
library through a writable mapping, which moves no time. All must still be hashed anew.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator

import boto3
import pytest
from botocore.config import Config

from corevault.capture import hashcache
from testbed import build, fusefs, runc, servers
from tests.conftest import Capture, starts_servers

pytestmark = pytest.mark.crash

SEED = {"alibabacloud.com/core-pattern": "/data/dump-a/core-%E-%p-%t"}


def sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def module(meta: dict, path: str) -> dict:
    [found] = [m for m in meta["modules"] if m["path"] == path]
    return found


def entry(capture: Capture, st: os.stat_result) -> str:
    return os.path.join(hashcache.cache_dir(capture.state_dir), f"{st.st_dev:x}-{st.st_ino:x}")


def crash_once(capture: Capture, rootfs: str, args: list[str], **kw: object) -> dict:
    """One crash, and its spool entry (the spool is emptied first)."""
    shutil.rmtree(capture.spool, ignore_errors=True)
    capture.crash(rootfs, args, annotations=SEED, **kw)
    [meta] = capture.entries()
    return meta


def rewrite_in_place(path: str) -> None:
    """Change one byte of the program's ``.comment`` (never loaded), in place."""
    with open(path, "r+b") as f:
        data = f.read()
        at = data.index(b"GCC: (")
        f.seek(at)
        f.write(b"gcc")


def test_a_binary_rewritten_in_place_with_its_mtime_put_back_is_hashed_again(
    capture: Capture, programs: dict[str, str], tmp_path
) -> None:
    rootfs = runc.build_rootfs(str(tmp_path / "root"), programs)
    exe = os.path.join(rootfs, "app/crasher")
    first = crash_once(capture, rootfs, ["/app/crasher", "segv"])
    before = os.stat(exe)
    assert module(first, "/app/crasher")["sha256"] == sha256(exe)
    remembered = os.stat(entry(capture, before))  # this version of the file is in the cache

    again = crash_once(capture, rootfs, ["/app/crasher", "segv"])
    assert module(again, "/app/crasher")["sha256"] == sha256(exe)
    assert os.stat(entry(capture, before)).st_mtime_ns == remembered.st_mtime_ns  # a hit: not written again

    rewrite_in_place(exe)
    os.utime(exe, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(exe)
    # everything a tenant can set is as it was; only the kernel's ctime moved
    assert (after.st_dev, after.st_ino, after.st_size, after.st_mtime_ns) == (
        before.st_dev, before.st_ino, before.st_size, before.st_mtime_ns,
    )  # fmt: skip
    assert after.st_ctime_ns != before.st_ctime_ns
    third = crash_once(capture, rootfs, ["/app/crasher", "segv"])
    changed = module(third, "/app/crasher")
    assert changed["sha256"] == sha256(exe) != module(first, "/app/crasher")["sha256"]


def test_a_cache_entry_cut_short_or_lost_means_a_new_hash_never_a_wrong_one(
    capture: Capture, programs: dict[str, str], tmp_path
) -> None:
    """Entries are renamed into place without fsync: a power cut may leave one empty, cut short
    (its digest too) or lost. Each is a miss, the file is hashed again and the entry written whole."""
    rootfs = runc.build_rootfs(str(tmp_path / "root"), programs)
    exe = os.path.join(rootfs, "app/crasher")
    crash_once(capture, rootfs, ["/app/crasher", "segv"])
    st = os.stat(exe)
    path = entry(capture, st)
    with open(path) as f:
        whole = f.read()
    name, stamp, digest = (
        whole.rstrip("\n").split(" ", 1)[0],
        *whole.rstrip("\n").split(" ", 1)[1].rsplit(" ", 1),
    )
    assert name == os.path.basename(path) and digest == sha256(exe)
    cache = hashcache.cache_dir(capture.state_dir)
    wrong = "0" * 64
    for left in (
        "", whole[: len(name) + 5], whole[:-40], whole[:-1],  # cut short
        whole[:-1] + "0",  # cut after the last digit, a stale byte after it
        f"{name} {stamp} {wrong}\n"[:-1], whole[:-3] + "\n",  # a digest that is not this entry's
        f"{name[:-1]}{'1' if name.endswith('0') else '0'} {stamp} {wrong}\n",  # another file's entry left in its blocks
    ):  # fmt: skip
        with open(path, "w") as f:
            f.write(left)
        assert hashcache.lookup(cache, st, stamp) is None, left
    again = crash_once(capture, rootfs, ["/app/crasher", "segv"])
    assert module(again, "/app/crasher")["sha256"] == sha256(exe)
    with open(path) as f:
        assert f.read() == whole  # written whole again
    os.unlink(path)  # lost
    third = crash_once(capture, rootfs, ["/app/crasher", "segv"])
    assert module(third, "/app/crasher")["sha256"] == sha256(exe)
    assert hashcache.lookup(cache, st, stamp) == sha256(exe)


def test_a_library_changed_through_a_writable_mapping_is_hashed_again(
    capture: Capture, programs: dict[str, str], tmp_path
) -> None:
    """Writes through a shared mapping whose pages are already writable move no time at all (on
    ext4 until writeback; on tmpfs ever): the pod's other process holding such a mapping may
    change a library under the same size, mtime and ctime."""
    rootfs = runc.build_rootfs(str(tmp_path / "root"), programs)
    lib = os.path.join(rootfs, "app/libcrashy.so")  # mapped, not run: a run file takes no writer
    with open(lib, "r+b") as f, mmap.mmap(f.fileno(), 0, mmap.MAP_SHARED) as writable:
        at = writable.find(b"GCC: (")  # .comment: never loaded
        for page in range(0, len(writable), mmap.PAGESIZE):
            writable[page] = writable[page]  # every page made writable now, its times moved now
        first = crash_once(capture, rootfs, ["/app/libuser"])
        assert module(first, "/app/libcrashy.so")["sha256"] == sha256(lib)
        before = os.stat(lib)

        writable[at : at + 3] = b"gcc"
        after = os.stat(lib)
        assert (after.st_size, after.st_mtime_ns, after.st_ctime_ns) == (
            before.st_size, before.st_mtime_ns, before.st_ctime_ns,
        )  # fmt: skip
        again = crash_once(capture, rootfs, ["/app/libuser"])
    changed = module(again, "/app/libcrashy.so")
    assert changed["sha256"] == sha256(lib) != module(first, "/app/libcrashy.so")["sha256"]


def test_binaries_on_a_disk_the_container_mounts_are_read_once_the_host_lists_it(
    capture: Capture, programs: dict[str, str], tmp_path
) -> None:
    """A disk that the runtime mounts in the container's namespace alone is the pod's own: its
    backing (here a loop device's file) may be the pod's to stop, so its binaries are not read.
    Once the host mounts it too (as the kubelet mounts a volume, then binds it into the pod), they
    are read, and remembered: which filesystems the cache trusts is read from the crashed
    process's own mountinfo, where the container's mount of that disk is its own."""
    app = tmp_path / "app"
    app.mkdir()
    shutil.copy(programs["crasher"], app / "crasher")
    image, seen = tmp_path / "app.ext4", tmp_path / "host"
    seen.mkdir()
    subprocess.run(["mkfs.ext4", "-q", "-d", str(app), str(image), "8M"], check=True)
    loop = subprocess.run(
        ["losetup", "--find", "--show", "--read-only", str(image)], capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        dev = os.stat(loop).st_rdev
        with open("/proc/self/mountinfo") as f:
            assert f" {os.major(dev)}:{os.minor(dev)} " not in f.read()  # not mounted out here
        rootfs = runc.build_rootfs(str(tmp_path / "root"), programs)
        mount = {"destination": "/opt", "type": "ext4", "source": loop, "options": ["ro"]}
        alone = module(crash_once(capture, rootfs, ["/opt/crasher", "segv"], mounts=[mount]), "/opt/crasher")
        assert alone["sha256"] is None and "pod's own filesystem (ext4" in alone["stored"], alone
        subprocess.run(["mount", "-o", "ro", loop, str(seen)], check=True)
        meta = crash_once(capture, rootfs, ["/opt/crasher", "segv"], mounts=[mount])
        assert module(meta, "/opt/crasher")["sha256"] == sha256(programs["crasher"])
        cached = os.listdir(hashcache.cache_dir(capture.state_dir))
        assert [n for n in cached if n.startswith(f"{dev:x}-")]  # remembered, as ext4 on the host's disk is
        again = crash_once(capture, rootfs, ["/opt/crasher", "segv"], mounts=[mount])
        assert module(again, "/opt/crasher")["sha256"] == sha256(programs["crasher"])
    finally:
        subprocess.run(["umount", str(seen)], check=False, capture_output=True)
        subprocess.run(["losetup", "--detach", loop], check=False)


@pytest.fixture(scope="module")
@starts_servers
def weed() -> Iterator[servers.Seaweed]:
    with servers.seaweed() as w:
        yield w


@pytest.fixture
def bucket_volume(weed: servers.Seaweed) -> Iterator[fusefs.Mount]:
    s3 = boto3.client(
        "s3", endpoint_url=weed.endpoint, aws_access_key_id=servers.KEY, aws_secret_access_key=servers.SECRET,
        region_name="us-east-1", config=Config(s3={"addressing_style": "path"}),
    )  # fmt: skip
    bucket = f"bins-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=bucket)
    with fusefs.mounted("s3fs", weed, bucket) as m:
        yield m


def test_a_binary_on_a_fuse_volume_is_never_served_from_the_cache(
    capture: Capture, rootfs: str, programs: dict[str, str], bucket_volume: fusefs.Mount
) -> None:
    """The FUSE server (here s3fs over a bucket the tenant writes) reports whatever metadata it
    likes: nothing about its files is remembered, and each crash hashes what it mapped."""
    exe = os.path.join(bucket_volume.path, "crasher")
    shutil.copyfile(programs["crasher"], exe)
    os.chmod(exe, 0o755)
    first = crash_once(capture, rootfs, ["/data/dump-a/crasher", "segv"], volume=bucket_volume.path)
    assert module(first, "/data/dump-a/crasher")["sha256"] == sha256(programs["crasher"])
    st = os.stat(exe)
    assert hashcache.Mounts().fs_type(st.st_dev) == "fuse.s3fs"
    assert not os.path.exists(entry(capture, st))
    cached = os.listdir(hashcache.cache_dir(capture.state_dir))
    assert cached and not [n for n in cached if n.startswith(f"{st.st_dev:x}-")]  # libc's is there, not this

    rewrite_in_place(exe)
    second = crash_once(capture, rootfs, ["/data/dump-a/crasher", "segv"], volume=bucket_volume.path)
    changed = module(second, "/data/dump-a/crasher")["sha256"]
    assert changed == sha256(exe) != module(first, "/data/dump-a/crasher")["sha256"]
    assert not os.path.exists(entry(capture, os.stat(exe)))


def test_a_pod_that_maps_many_files_pushes_out_entries_nobody_used_not_the_whole_cache(
    capture: Capture, programs: dict[str, str], tmp_path
) -> None:
    """Pod B's crashes map 600 distinct files each, more than the cache holds in two: room is
    made by the entries used longest ago, and pod A's crash loop, which used its entries in
    between, keeps them (emptying the cache when full sent A back to hashing)."""
    capture.configure("[capture]\nmax_objects = 1000\n")
    a = runc.build_rootfs(str(tmp_path / "a"), programs)
    mapmany = build.build_variant("mapmany", "mapmany.c", ["gcc", "-O1", "-Wall", "-Werror"])
    b = runc.build_rootfs(str(tmp_path / "b"), {"mapmany": mapmany})

    def copies(name: str, n: int) -> str:
        """``n`` copies of one ELF file: one content, each file an inode and a cache entry of its own."""
        os.makedirs(os.path.join(b, "app", name))
        for i in range(n):
            shutil.copyfile(mapmany, os.path.join(b, "app", name, str(i)))
        return f"/app/{name}"

    cache = hashcache.cache_dir(capture.state_dir)
    exe = os.path.join(a, "app/crasher")
    for _ in range(2):  # (the second is a hit: a first read's atime is the kernel's, relatime's)
        crash_once(capture, a, ["/app/crasher", "segv"])
    mine = set(os.listdir(cache))
    written = os.stat(entry(capture, os.stat(exe))).st_mtime_ns
    crash_once(capture, b, ["/app/mapmany", copies("many", 600)])
    flood = set(os.listdir(cache)) - mine
    assert len(flood) > 600 and len(mine | flood) < hashcache.MAX_ENTRIES
    crash_once(capture, a, ["/app/crasher", "segv"])  # A's loop goes on: its entries are used

    crash_once(capture, b, ["/app/mapmany", copies("more", 600)])
    left = set(os.listdir(cache))
    assert hashcache.MAX_ENTRIES - hashcache.EVICT <= len(left) <= hashcache.MAX_ENTRIES
    assert mine <= left, "the entries of a pod that used them meanwhile were pushed out"
    assert (
        os.stat(entry(capture, os.stat(exe))).st_mtime_ns == written
    )  # kept, never emptied and written again
    assert flood - left and flood & left, "room is made of the entries used longest ago, a few at a time"
    again = crash_once(capture, a, ["/app/crasher", "segv"])
    assert module(again, "/app/crasher")["sha256"] == sha256(exe)
    assert os.stat(entry(capture, os.stat(exe))).st_mtime_ns == written  # a hit
