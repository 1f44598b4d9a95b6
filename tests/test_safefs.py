"""Publishing a file into a hostile directory: no link followed, nothing replaced."""

from __future__ import annotations

import errno
import os
import stat

import pytest

from corevault.capture import safefs


@pytest.fixture
def root(tmp_path):
    (tmp_path / "data" / "dump").mkdir(parents=True)
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    yield tmp_path, fd
    os.close(fd)


def write_file(dir_fd: int, name: str, data: bytes = b"core", **kw: int) -> str:
    f = safefs.NewFile(dir_fd)
    os.write(f.fd, data)
    return f.publish(name, os.getuid(), os.getgid(), **kw)


def test_publish_gives_name_owner_and_mode(root) -> None:
    path, fd = root
    d = safefs.open_dir(fd, "/data/dump")
    try:
        assert write_file(d, "core") == "core"
    finally:
        os.close(d)
    st = os.stat(path / "data/dump/core")
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert (path / "data/dump/core").read_bytes() == b"core"
    assert os.listdir(path / "data/dump") == ["core"]


def test_taken_names_get_a_suffix(root) -> None:
    path, fd = root
    d = safefs.open_dir(fd, "/data/dump")
    try:
        assert [write_file(d, "core") for _ in range(3)] == ["core", "core.1", "core.2"]
        with pytest.raises(FileExistsError):
            write_file(d, "core", max_suffix=2)
    finally:
        os.close(d)
    assert sorted(os.listdir(path / "data/dump")) == ["core", "core.1", "core.2"]


@pytest.mark.parametrize("target", ["/", "../..", "/etc"])
def test_symlinks_anywhere_on_the_path_are_refused(root, target: str) -> None:
    path, fd = root
    (path / "data" / "link").symlink_to(target)
    with pytest.raises(safefs.UnsafePath, match="/data/link is a symbolic link"):
        safefs.open_dir(fd, "/data/link/x")
    with pytest.raises(safefs.UnsafePath, match="symbolic link"):
        safefs.open_dir(fd, "/data/link")


def test_dot_components_and_non_directories(root) -> None:
    path, fd = root
    (path / "data" / "file").write_text("x")
    os.mkfifo(path / "data" / "fifo")
    with pytest.raises(safefs.UnsafePath, match=r"'\.' or '\.\.'"):
        safefs.open_dir(fd, "/data/../data/dump")
    with pytest.raises(safefs.UnsafePath, match="not a directory"):
        safefs.open_dir(fd, "/data/file")
    with pytest.raises(safefs.UnsafePath, match="not a directory"):
        safefs.open_dir(fd, "/data/fifo")
    with pytest.raises(safefs.UnsafePath, match="does not exist"):
        safefs.open_dir(fd, "/data/missing")


def test_discarded_file_leaves_nothing(root) -> None:
    path, fd = root
    d = safefs.open_dir(fd, "/data/dump")
    f = safefs.NewFile(d)
    os.write(f.fd, b"half")
    f.discard()
    os.close(d)
    assert os.listdir(path / "data/dump") == []


@pytest.fixture
def no_tmpfile(monkeypatch: pytest.MonkeyPatch) -> None:
    """A filesystem without O_TMPFILE, like NFS: the temporary-name path is taken."""
    real_open = os.open

    def fake_open(p, flags, *args, **kw):
        if flags & os.O_TMPFILE == os.O_TMPFILE:
            raise OSError(errno.EOPNOTSUPP, "Operation not supported")
        return real_open(p, flags, *args, **kw)

    monkeypatch.setattr(os, "open", fake_open)


def test_without_o_tmpfile_a_temporary_name_is_used_and_removed(root, no_tmpfile) -> None:
    path, fd = root
    d = safefs.open_dir(fd, "/data/dump")
    try:
        f = safefs.NewFile(d)
        assert f.tmp_name is not None and f.tmp_name.startswith(".corevault-")
        os.write(f.fd, b"core")
        assert f.publish("core", os.getuid(), os.getgid()) == "core"
    finally:
        os.close(d)
    assert os.listdir(path / "data/dump") == ["core"]


@pytest.mark.parametrize("filesystem", ["no_tmpfile", "no_links"])
def test_a_swapped_temporary_file_is_not_published(
    root, filesystem: str, request: pytest.FixtureRequest
) -> None:
    """On a filesystem without O_TMPFILE (NFS), and on one without hard links either (a FUSE bucket)."""
    request.getfixturevalue(filesystem)
    path, fd = root
    d = safefs.open_dir(fd, "/data/dump")
    try:
        f = safefs.NewFile(d)
        # The container replaces the temporary name with a file of its own.
        (path / "data/dump/planted").write_text("attacker")
        os.rename(path / "data/dump/planted", path / "data/dump" / f.tmp_name)
        with pytest.raises(safefs.UnsafePath, match="replaced"):
            f.publish("core", os.getuid(), os.getgid())
    finally:
        os.close(d)
    assert not (path / "data/dump/core").exists()


@pytest.fixture
def no_links(monkeypatch: pytest.MonkeyPatch, no_tmpfile) -> None:
    """A filesystem without hard links either, like every bucket mounted through FUSE."""

    def refuse(*args, **kw):
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(os, "link", refuse)


def test_without_links_the_name_is_reserved_and_nothing_is_replaced(root, no_links) -> None:
    path, fd = root
    (path / "data/dump/core").write_text("old")
    d = safefs.open_dir(fd, "/data/dump")
    try:
        assert [write_file(d, "core", b"new") for _ in range(2)] == ["core.1", "core.2"]
    finally:
        os.close(d)
    assert (path / "data/dump/core").read_text() == "old"
    assert (path / "data/dump/core.1").read_bytes() == (path / "data/dump/core.2").read_bytes() == b"new"
    assert sorted(os.listdir(path / "data/dump")) == ["core", "core.1", "core.2"]


def test_without_links_a_file_swapped_in_during_the_rename_is_not_published(
    root, no_links, monkeypatch
) -> None:
    """The temporary name is swapped after it was checked, while the name is reserved: what the
    rename gave the name is checked again, taken away and not published (tests/test_fuse_volumes.py
    wins this race from a real container on a real FUSE bucket)."""
    path, fd = root
    real_rmdir = os.rmdir
    d = safefs.open_dir(fd, "/data/dump")
    f = safefs.NewFile(d)
    os.write(f.fd, b"core")

    def swap_then_rmdir(name, **kw):
        (path / "data/dump/planted").write_text("attacker")
        os.rename(path / "data/dump/planted", path / "data/dump" / f.tmp_name)
        real_rmdir(name, **kw)

    monkeypatch.setattr(os, "rmdir", swap_then_rmdir)
    try:
        with pytest.raises(safefs.UnsafePath, match="replaced while it was renamed"):
            f.publish("core", os.getuid(), os.getgid())
    finally:
        os.close(d)
    assert os.listdir(path / "data/dump") == []


def test_the_walk_says_where_it_is_and_opens_only_the_directory_it_reaches(root) -> None:
    """Every fd the walk holds is told before the one it replaces is closed; those on the way are
    ``O_PATH`` (a filesystem is asked no ``opendir`` for them), the directory reached is readable."""
    path, fd = root
    told: list[tuple[int, str, bool]] = []

    def at(held: int) -> None:
        if held < 0:
            told.append((held, "", False))
            return
        with open(f"/proc/self/fdinfo/{held}") as f:
            flags = int(f.read().split("flags:")[1].split()[0], 8)
        told.append((held, os.readlink(f"/proc/self/fd/{held}"), bool(flags & os.O_PATH)))

    d = safefs.open_dir(fd, "/data/dump", at)
    try:
        assert [(where, o_path) for _, where, o_path in told] == [
            (str(path), True), (str(path / "data"), True), (str(path / "data/dump"), True),
            (str(path / "data/dump"), False),
        ]  # fmt: skip
        assert told[-1][0] == d
        assert os.listdir(d) == []
    finally:
        os.close(d)
    told.clear()
    (path / "data" / "link").symlink_to(path / "data" / "dump")
    with pytest.raises(safefs.UnsafePath, match="symbolic link"):
        safefs.open_dir(fd, "/data/link", at)
    assert told[-1] == (-1, "", False)  # nothing held is left told
