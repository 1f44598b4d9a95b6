"""Replacing a file whole: the old content or the new one, never a mix, whatever fails midway."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading

import pytest

from corevault import atomic


def test_write_replaces_the_file_with_the_mode_asked_whatever_the_umask(tmp_path) -> None:
    path = tmp_path / "state.json"
    path.write_text("old")
    old_umask = os.umask(0o077)
    try:
        atomic.write(str(path), '{"new": 1}', 0o644)
    finally:
        os.umask(old_umask)
    assert path.read_text() == '{"new": 1}'
    assert os.stat(path).st_mode & 0o777 == 0o644
    assert os.listdir(tmp_path) == ["state.json"]


def test_an_error_in_the_block_leaves_the_old_file_and_no_temporary_one(tmp_path) -> None:
    path = tmp_path / "blob"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic.replacing(str(path)) as f:
        f.write(b"half of the new")
        raise RuntimeError("the source broke off")
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["blob"]


def test_abandon_leaves_the_old_file_without_an_error(tmp_path) -> None:
    path = tmp_path / "debuginfo"
    with atomic.replacing(str(path)) as f:
        f.write(b"not the file asked for")
        assert os.path.exists(f.name) and not path.exists()
        raise atomic.Abandon
    assert os.listdir(tmp_path) == []


def test_a_write_the_filesystem_refuses_midway_never_replaces_the_file(tmp_path) -> None:
    """The kernel refuses the write past RLIMIT_FSIZE, as a full disk refuses it past its room."""
    path = tmp_path / "snapshot"
    path.write_bytes(b"good")
    child = (
        "import errno, resource, signal, sys\n"
        "from corevault import atomic\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))\n"
        "try:\n"
        "    atomic.write(sys.argv[1], b'x' * (4 << 20))\n"
        "except OSError as e:\n"
        "    sys.exit(e.errno)\n"
    )
    result = subprocess.run([sys.executable, "-c", child, str(path)], check=False, timeout=60)
    assert result.returncode == errno.EFBIG
    assert path.read_bytes() == b"good" and os.listdir(tmp_path) == ["snapshot"]


def test_a_symlink_planted_at_the_temporary_name_is_not_followed(tmp_path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"untouched")
    path = tmp_path / "index.json"
    os.symlink(victim, f"{path}.{os.getpid()}.{threading.get_native_id()}.tmp")
    with pytest.raises(OSError) as e:
        atomic.write(str(path), b"{}")
    assert e.value.errno == errno.ELOOP
    assert victim.read_bytes() == b"untouched" and not path.exists()


def test_threads_writing_one_path_leave_one_whole_content(tmp_path) -> None:
    path = str(tmp_path / "object")
    contents = [bytes([i]) * (256 << 10) for i in range(8)]
    errors: list[BaseException] = []

    def writer(data: bytes) -> None:
        try:
            for _ in range(5):
                atomic.write(path, data)
        except BaseException as e:  # reported below, where the test can fail on it
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(c,)) for c in contents]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    with open(path, "rb") as f:
        assert f.read() in contents
    assert os.listdir(tmp_path) == ["object"]


def test_a_temporary_name_says_which_file_it_was_to_become(tmp_path) -> None:
    seen = []
    with atomic.replacing(str(tmp_path / "a.core.zst")) as f:
        seen.append(atomic.target(f.name))
    assert seen == [str(tmp_path / "a.core.zst")]
    assert atomic.target("a.core.zst") is None and atomic.target("x.1.tmp") is None
    assert atomic.target("planted.tmp") is None and atomic.target(".1.2.tmp") is None


def test_the_file_store_skips_and_removes_only_writes_a_kill_left_behind(tmp_path) -> None:
    from corevault.vault import blobs

    store = blobs.FsStore(str(tmp_path))
    store.put_bytes("cores/a.zst", b"core")
    left = tmp_path / "cores" / "b.zst.4242.4243.tmp"  # as a write killed midway leaves it
    left.write_bytes(b"half")
    os.utime(left, (1, 1))
    assert dict(store.keys("cores")) == {"cores/a.zst": 4}
    assert store.abort_abandoned(60) == ["cores/b.zst"]
    assert sorted(os.listdir(tmp_path / "cores")) == ["a.zst"]
