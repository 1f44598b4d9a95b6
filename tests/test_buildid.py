"""Build-ids of mapped ELF objects, read from the files the process really mapped."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from corevault import elf, nodestore, objectid
from corevault.capture import buildid
from testbed import build


def readelf_build_id(path: str) -> str:
    out = subprocess.run(["eu-readelf", "-n", path], capture_output=True, text=True, check=True).stdout
    return next(line.split()[-1] for line in out.splitlines() if "Build ID" in line)


@pytest.mark.parametrize(
    "path", ["/bin/sleep", "/lib/x86_64-linux-gnu/libc.so.6", "/lib64/ld-linux-x86-64.so.2"]
)
def test_build_id_matches_elfutils(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        assert buildid.read_build_id(fd) == readelf_build_id(path)
    finally:
        os.close(fd)


@pytest.mark.parametrize(
    "content", [b"", b"\x7fELF", b"not an elf at all" * 10, b"\x7fELF\x02\x01" + b"\xff" * 58]
)
def test_non_elf_and_broken_headers_have_no_build_id(tmp_path, content: bytes) -> None:
    (tmp_path / "f").write_bytes(content)
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    try:
        assert buildid.read_build_id(fd) is None
    finally:
        os.close(fd)


@pytest.mark.crash  # root: /proc/PID/map_files and the store's owner, as the handler has them
def test_mapped_objects_of_a_live_process_are_opened_and_stored(tmp_path) -> None:
    proc = subprocess.Popen(["sleep", "30"])
    try:
        proc_fd = os.open(f"/proc/{proc.pid}", os.O_RDONLY | os.O_DIRECTORY)
        while Path(f"/proc/{proc.pid}/stat").read_text().split()[2] != "S":
            time.sleep(0.01)  # right after exec the dynamic loader is still mapping libraries
        with open(f"/proc/{proc.pid}/maps") as f:
            maps = f.read()
        modules, skipped = buildid.open_modules(proc_fd, maps)
        assert skipped is None
        os.close(proc_fd)
    finally:
        proc.kill()
        proc.wait()
    paths = {m.path for m in modules}
    assert "/usr/bin/sleep" in paths and "/usr/lib/x86_64-linux-gnu/libc.so.6" in paths
    asked: list[int] = []

    def room() -> int:  # measuring the store walks it: only asked once a file is to be copied
        asked.append(1)
        return 1 << 30

    buildid.store_modules(str(tmp_path), modules, room)  # the process is gone: the fds still work
    assert asked == [1]
    for m in modules:
        assert m.stored == "new" and m.fd == -1
        content = Path(m.path).read_bytes()
        assert m.key == m.build_id and m.sha256 == hashlib.sha256(content).hexdigest()
        assert (tmp_path / "buildid" / m.key / m.sha256).read_bytes() == content
    self_fd = os.open("/proc/self", os.O_RDONLY | os.O_DIRECTORY)
    again, _ = buildid.open_modules(self_fd, Path("/proc/self/maps").read_text())
    os.close(self_fd)
    buildid.store_modules(str(tmp_path), [m for m in again if m.path in paths], room)
    libc = next(m for m in again if m.path.endswith("libc.so.6"))
    assert libc.stored == "held" and asked == [1]  # all held: the room was not asked again
    for m in again:
        if m.fd >= 0:
            os.close(m.fd)


#: a process mapping, from offset 0, a device (a node of /dev/zero's numbers) and a regular file
MAPS_A_DEVICE = """
import mmap, os, sys, time
maps = []
for path in sys.argv[1:]:
    fd = os.open(path, os.O_RDONLY)
    maps.append(mmap.mmap(fd, 4096, mmap.MAP_PRIVATE, mmap.PROT_READ))
    os.close(fd)
print("mapped", flush=True)
time.sleep(60)
"""


def _opens_of(path: str):
    """An inotify descriptor counting the opens of ``path``, and a function reading the count."""
    import ctypes
    import struct

    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
    assert fd >= 0 and libc.inotify_add_watch(fd, path.encode(), 0x20) >= 0  # IN_OPEN

    def count() -> int:
        n = 0
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return 0
        while data:
            n += 1
            data = data[16 + struct.unpack_from("iIII", data)[3] :]
        return n

    return fd, count


@pytest.mark.skipif(os.geteuid() != 0, reason="making a device node and reading map_files need root")
@pytest.mark.parametrize("path_only", [False, True], ids=["pipe", "socket"])
def test_a_mapped_device_is_never_opened(tmp_path, path_only: bool) -> None:
    """A process may map a device at offset 0 (a pod's GPU, or any node its container has):
    its own open may act (a watchdog starts, a tape rewinds), so the capture opens only regular
    files for reading, both as the pipe handler holds them and as socket mode opens them after
    the let-go; the device is left out of the modules."""
    device = tmp_path / "zero"
    os.mknod(device, 0o600 | 0o020000, os.makedev(1, 5))
    regular = tmp_path / "data"
    regular.write_bytes(b"not an ELF file" * 1000)
    proc = subprocess.Popen(
        [sys.executable, "-c", MAPS_A_DEVICE, str(device), str(regular)], stdout=subprocess.PIPE
    )
    watch, opens = _opens_of(str(device))
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"mapped\n"
        opens()  # the process's own open, before the watch's time
        proc_fd = os.open(f"/proc/{proc.pid}", os.O_RDONLY | os.O_DIRECTORY)
        maps = Path(f"/proc/{proc.pid}/maps").read_text()
        assert str(device) in maps and str(regular) in maps
        held, _ = buildid.hold_modules(proc_fd, maps, path_only=path_only)
        os.close(proc_fd)
        assert str(device) not in {m.path for m in held} or path_only
        found, _ = buildid.identify_modules(held, reopen=path_only)
        assert opens() == 0, "the device's open was called"
        assert str(device) not in {m.path for m in found}
        assert all(m.fd == -1 for m in held if m.path == str(device))
        for m in found:
            if m.fd >= 0:
                os.close(m.fd)
    finally:
        os.close(watch)
        proc.kill()
        proc.wait()


def test_maps_parsing_takes_offset_zero_mappings_once() -> None:
    maps = (
        "55d0a0000000-55d0a0002000 r--p 00000000 fd:00 100 /app/x\n"
        "55d0a0002000-55d0a0005000 r-xp 00002000 fd:00 100 /app/x\n"
        "7f0000000000-7f0000001000 rw-p 00000000 00:00 0 \n"
        "7f0000001000-7f0000002000 r--p 00000000 fd:00 200 /lib/with space.so (deleted)\n"
        "7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0 [stack]\n"
        "00400000-00401000 r--p 00000000 00:1a3 300 /app/static\n"
    )
    assert buildid.mapped_objects(maps) == [
        ("/app/x", "55d0a0000000-55d0a0002000", 0x55D0A0000000, 0x55D0A0005000),
        ("/lib/with space.so (deleted)", "7f0000001000-7f0000002000", 0x7F0000001000, 0x7F0000002000),
        # map_files names have no leading zeros
        ("/app/static", "400000-401000", 0x400000, 0x401000),
    ]


def test_go_build_id_is_read_as_go_itself_reads_it() -> None:
    exe = build.build_go("nokey.go")
    fd = os.open(exe, os.O_RDONLY)
    try:
        gnu, go = elf.build_ids(lambda offset, size: os.pread(fd, size, offset))
    finally:
        os.close(fd)
    out = subprocess.run(["go", "tool", "buildid", exe], capture_output=True, text=True, check=True).stdout
    assert gnu is None and go == out.strip()
    assert objectid.key_for(gnu, go, None) == objectid.go_key(go) and objectid.KEY.match(objectid.go_key(go))


@pytest.mark.crash  # root: the store's files are given to root, as the handler has them
def test_sparse_objects_are_hashed_whole_and_stored_with_their_holes(tmp_path) -> None:
    src = tmp_path / "big.so"
    shutil.copy("/lib/x86_64-linux-gnu/libc.so.6", src)
    with open(src, "r+b") as f:
        f.truncate(256 << 20)
        f.seek(200 << 20)
        f.write(b"data after a hole")
    m = buildid.Module(str(src), 0x1000, 0x2000)
    m.fd = os.open(src, os.O_RDONLY)
    m.build_id = buildid.read_build_id(m.fd)
    buildid.store_modules(str(tmp_path / "store"), [m], room=64 << 20)
    assert m.stored == "new" and m.sha256 == hashlib.sha256(src.read_bytes()).hexdigest()
    held = tmp_path / "store" / "buildid" / m.build_id / m.sha256
    assert held.read_bytes() == src.read_bytes()
    assert held.stat().st_blocks * 512 < 8 << 20  # the 256 MiB file's holes stay holes
    m2 = buildid.Module(str(src), 0x1000, 0x2000)
    m2.fd = os.open(src, os.O_RDONLY)
    m2.build_id = m.build_id
    buildid.store_modules(str(tmp_path / "store"), [m2], room=0)
    assert m2.stored == "held"  # the same content: kept once, no room needed


def test_an_object_that_does_not_fit_is_not_stored(tmp_path) -> None:
    m = buildid.Module("/usr/bin/sleep", 0x1000, 0x2000)
    m.fd = os.open("/usr/bin/sleep", os.O_RDONLY)
    m.build_id = buildid.read_build_id(m.fd)
    buildid.store_modules(str(tmp_path), [m], room=4096)
    assert m.stored.startswith("not stored: no room") and m.fd == -1
    assert list(nodestore.objects(str(tmp_path))) == []
    st = os.statvfs(tmp_path)
    free = st.f_bavail * st.f_frsize
    assert nodestore.room(str(tmp_path), 1 << 40, 0, 1 << 40, keep_free=free + (1 << 30)) == 0
    assert nodestore.room(str(tmp_path), 1 << 40, 5 << 20, 6 << 20, keep_free=0) <= 1 << 20
