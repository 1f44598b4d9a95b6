"""The pipe handler's start-up: what it imports, and the cheap stand-ins it uses for what it does not.

Every module the handler imports is paid for on every crash, while the crashed process waits
(bench/capture.py --fixed-only measures it). The stand-ins must give what the standard
library's modules give: a test compares each with its original.
"""

from __future__ import annotations

import bisect
import fnmatch
import hashlib
import marshal
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corevault import bytecode, config, fingerprint, hashing, hostsetup, spool
from corevault.capture import delivery
from corevault.pattern import SPECIFIERS

#: what the handler must not import on the common path, and what each costs it (CPU, this machine)
HEAVY = {
    "enum": "~5 ms", "re": "~7 ms", "json": "~10 ms", "contextlib": "~5 ms", "collections": "~3 ms",
    "functools": "~4 ms", "signal": "~6 ms", "typing": "~10 ms", "importlib.machinery": "~1 ms",
    "fnmatch": "re", "dataclasses": "~10 ms", "inspect": "~10 ms", "hashlib": "~3.5 ms (libcrypto)",
    "resource": "~0.2 ms (an extension; the kernel sets RLIMIT_CORE, /proc gives the peak RSS)",
    "_queue": "~0.2 ms (an extension, for the threads of a core larger than a block)",
    "corevault.crashrecord": "0.9 M instructions (eight record classes; the handler writes plain dicts)",
    "shutil": "22 M instructions, ~45 % of the handler's (re, enum, fnmatch, bz2, lzma, zlib with it)",
    "bisect": "~0.16 ms (its Python part, then _bisect) for the fingerprint's 65 lookups",
    "_bisect": "an extension: bisect's C part",
}  # fmt: skip


def test_signal_names_are_the_signal_module_s() -> None:
    for number in range(-2, 80):
        try:
            expected: str | None = signal.Signals(number).name
        except ValueError:
            expected = None
        assert delivery.signal_name(number) == expected, number


def test_the_peak_rss_is_the_one_getrusage_gives() -> None:
    import resource

    held = bytearray(64 << 20)  # touched: every page of it is resident
    held[::4096] = b"x" * (len(held) // 4096)
    peak = delivery.peak_rss_kib()
    # ru_maxrss can only be higher (it keeps what the parent held at exec, too), give or take the
    # kernel's per-CPU RSS counters, which the two read a moment apart
    assert peak is not None and 64 << 10 <= peak <= resource.getrusage(resource.RUSAGE_SELF).ru_maxrss + 1024
    del held


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 1 << 20), st.integers(1, 1 << 12), st.sampled_from("abc")), max_size=12
    ),
    st.lists(st.integers(0, (1 << 20) + (1 << 13)), max_size=70),
)
def test_the_fingerprint_finds_each_address_s_object_as_bisect_does(spans, addresses) -> None:
    objects = sorted((start, start + length, key) for start, length, key in spans)
    starts = [start for start, _, _ in objects]
    expected = {}
    for address in addresses:
        i = bisect.bisect_right(starts, address) - 1
        if i >= 0 and address < objects[i][1]:
            expected[address] = f"{objects[i][2]}+{address - objects[i][0]:x}"
    assert fingerprint._places(addresses, objects) == expected


GLOB_CHARS = st.sampled_from(list("ab/.*?[]!-^\\"))


@settings(max_examples=500, deadline=None)
@given(st.text("ab/.-\\[]", max_size=10), st.text(GLOB_CHARS, max_size=8))
def test_rules_match_exactly_what_fnmatchcase_matches(name: str, pattern: str) -> None:
    assert config.glob_match(name, pattern) == fnmatch.fnmatchcase(name, pattern)


@pytest.mark.parametrize(
    ("name", "pattern", "expected"),
    [
        ("/usr/bin/sleep", "*/sleep", True), ("/usr/bin/sleep", "/usr/*/sl?ep", True),
        ("/usr/bin/sleepy", "*/sleep", False), ("sleep", "*/sleep", False), ("a*b", "a*b", True),
        ("abcabd", "a*d", True), ("", "*", True), ("x", "", False), ("/usr/local/bin/my-server2", "/usr/local/bin/my-server*", True),
    ],
)  # fmt: skip
def test_rules_glob(name: str, pattern: str, expected: bool) -> None:
    assert config.glob_match(name, pattern) is expected


@pytest.mark.parametrize("size", [0, 1, 4096, hashing.SMALL, hashing.SMALL + 1, 3 << 20])
def test_both_sha256_implementations_give_hashlib_s_digest(size: int) -> None:
    data = os.urandom(size)
    h = hashing.sha256(size)
    h.update(data)
    assert h.hexdigest() == hashing.sha256_hex(data) == hashlib.sha256(data).hexdigest()
    assert (type(h).__module__ == "_hashlib") is (size > hashing.SMALL)  # OpenSSL's only when large


def sleep_crash(pid: int, pidfd: int) -> list[str]:
    """The handler's arguments, in core_pattern's order, for a crash of ``sleep`` at ``pid``."""
    p = str(pid)
    values = {
        "P": p, "p": p, "i": p, "I": p, "s": "11", "t": str(int(time.time())), "d": "1",
        "u": "0", "g": "0", "c": str((1 << 64) - 1), "C": "0", "h": "h", "e": "sleep", "f": "sleep",
        "E": "!usr!bin!sleep", "F": str(pidfd),
    }  # fmt: skip
    return [values[s] for s in SPECIFIERS]


class Stage:
    """A live stand-in for a crashed process, opted in by a host rule, and the launcher to capture it."""

    def __init__(self, tmp_path) -> None:
        self.out = tmp_path / "vol"
        self.out.mkdir()
        conf = tmp_path / "c.toml"
        conf.write_text(
            f'state_dir = "{tmp_path}/state"\n[capture]\ntargets = ["volume", "vault"]\n'
            f'[[rules]]\nexe = "*/sleep"\npattern = "{self.out}/core-%p"\n'
        )
        self.settings, self.snapshot = config.write_snapshot(str(conf))
        self.launcher = hostsetup.isolated_launcher(str(tmp_path / hostsetup.LAUNCHER_NAME))
        self.seen = tmp_path / "modules"

    def capture(self) -> list[str]:
        """Capture one 4 KiB core of a live ``sleep``; the modules the handler had imported at its end."""
        with open(self.launcher) as f:
            text = f.read()
        # the launcher's own text, with the handler's modules written down as it exits
        probe = text.replace(
            "quick_exit(main())\n",
            f"code = main()\nopen({str(self.seen)!r}, 'w').write(' '.join(sys.modules))\nquick_exit(code)\n",
        )
        proc = subprocess.Popen(["sleep", "600"])
        pidfd = os.pidfd_open(proc.pid)
        try:
            done = subprocess.run(
                [sys.executable, "-I", "-S", "-c", probe, "-c", self.snapshot, *sleep_crash(proc.pid, pidfd)],
                input=b"\x7fELF" + bytes(4092), pass_fds=(pidfd,), cwd="/", check=False,
                env={"PATH": "/usr/bin:/bin"}, capture_output=True,
            )  # fmt: skip
            assert done.returncode == 0, done.stderr.decode()
        finally:
            os.close(pidfd)
            proc.kill()
            proc.wait()
        assert (self.out / f"core-{proc.pid}").stat().st_size == 4096
        return self.seen.read_text().split()


@pytest.mark.crash  # reads another process's mapped files, as only the handler may
def test_a_capture_through_the_launcher_imports_nothing_heavy(tmp_path) -> None:
    stage = Stage(tmp_path)
    first = stage.capture()
    again = stage.capture()
    [one, two] = [
        spool.read_meta(stage.settings.spool_dir, e) for e in spool.entries(stage.settings.spool_dir)
    ]
    assert one["signal"]["name"] == "SIGSEGV" and one["core"]["size"] == 4096
    assert (
        one["core"]["sha256"] == two["core"]["sha256"] == hashlib.sha256(b"\x7fELF" + bytes(4092)).hexdigest()
    )
    # the second crash of the same binaries takes their content hashes from the cache
    assert [m["sha256"] for m in one["modules"]] == [m["sha256"] for m in two["modules"]]
    assert {m["path"] for m in two["modules"]} >= {"/usr/bin/sleep"}
    for modules in (first, again):
        assert "corevault.capture.delivery" in modules
    heavy = {name: HEAVY[name] for name in HEAVY if name in again}
    assert not heavy, f"the handler imported {heavy}"


def _loaders(launcher: str) -> dict[str, str]:
    """How a fresh ``python -I -S`` running ``launcher`` imported each of corevault's modules."""
    with open(launcher) as f:
        text = f.read()
    probe = text.replace(
        "from corevault.capture.handler import main, quick_exit\nquick_exit(main())\n",
        "import corevault.capture.handler\n"
        "print(' '.join(f'{n}={type(m.__spec__.loader).__name__}' for n, m in sys.modules.items()"
        " if n.startswith('corevault')))\n",
    )
    out = subprocess.run(
        [sys.executable, "-I", "-S", "-c", probe], capture_output=True, text=True, cwd="/", check=True
    )
    return dict(pair.split("=") for pair in out.stdout.split())


def _rewrite(path: str, change) -> None:
    """Write the launcher's compiled modules again with ``change`` applied to what they hold."""
    held = bytecode._read(path)
    assert held is not None
    change(held)
    with open(path, "wb") as f:
        f.write(bytecode._FORMAT + bytecode.MAGIC_NUMBER + marshal.dumps(held))


def test_the_launcher_runs_the_crash_path_from_its_compiled_modules(tmp_path) -> None:
    launcher = hostsetup.isolated_launcher(str(tmp_path / hostsetup.LAUNCHER_NAME))
    loaders = _loaders(launcher)
    assert loaders["corevault.capture.delivery"] == loaders["corevault.spool"] == "_Loader"
    ordinary = {n for n, kind in loaders.items() if kind != "_Loader"}
    assert ordinary == {"corevault", "corevault.bytecode"}  # imported before the finder is in place


def test_the_compiled_modules_hold_no_docstrings(tmp_path) -> None:
    """Compiled as ``python -OO`` does: the crash path's docstrings are a fifth of the file, read
    and unmarshalled on every crash, and nothing on it reads them."""
    launcher = hostsetup.isolated_launcher(str(tmp_path / hostsetup.LAUNCHER_NAME))
    held = bytecode._read(launcher + hostsetup.BYTECODE_SUFFIX)
    assert held is not None
    module = held["corevault.capture.delivery"][3]
    assert delivery.__doc__ and delivery._finish_entry.__doc__  # the source has them
    consts = [c for c in module.co_consts if isinstance(c, str)]
    assert delivery.__doc__ not in consts
    finish = next(c for c in module.co_consts if getattr(c, "co_name", None) == "_finish_entry")
    assert delivery._finish_entry.__doc__ not in finish.co_consts


def test_the_crash_path_s_extension_modules_are_found_where_the_import_system_finds_them(tmp_path) -> None:
    """Held by path and stamp, so that loading them costs no search of ``sys.path``; a changed
    file is found the ordinary way."""
    from importlib.machinery import ExtensionFileLoader, PathFinder

    launcher = hostsetup.isolated_launcher(str(tmp_path / hostsetup.LAUNCHER_NAME))
    held = bytecode._read(launcher + hostsetup.BYTECODE_SUFFIX)
    assert held is not None
    extensions = {name for name, entry in held.items() if entry[3] is None}
    assert {"_json", "fcntl", "_struct"} <= extensions and ({"_sha256", "_sha2"} & extensions)
    finder = bytecode._Finder(held)
    for name in extensions:
        spec = finder.find_spec(name)
        assert spec is not None and isinstance(spec.loader, ExtensionFileLoader), name
        assert spec.origin == PathFinder.find_spec(name).origin and spec.has_location
    source, package, (dev, ino, size, mtime_ns, ctime_ns), code, cached = held["_json"]
    held["_json"] = (source, package, (dev, ino, size, mtime_ns, ctime_ns + 1), code, cached)
    assert finder.find_spec("_json") is None  # replaced since: the import system's own search


def test_only_corevault_s_bootstrap_is_looked_for_in_its_directory_first(tmp_path) -> None:
    """While corevault's directory leads ``sys.path``, the two modules that read the compiled modules
    are all that is found in a directory (the rest is built in or frozen); afterwards the standard
    library's directories come first again, and the crash path never has ``lib-dynload`` listed."""
    launcher = hostsetup.isolated_launcher(str(tmp_path / hostsetup.LAUNCHER_NAME))
    with open(launcher) as f:
        text = f.read()
    bootstrap = "from corevault import bytecode\n"
    assert text.count(bootstrap) == 1
    probe = text.replace(
        bootstrap, f"before = set(sys.modules)\n{bootstrap}new = set(sys.modules) - before\n"
    )
    probe = probe.replace(
        "from corevault.capture.handler import main, quick_exit\nquick_exit(main())\n",
        "import corevault.capture.handler\nfrom corevault import hashing\nhashing.sha256(0)\n"
        "print([(n, type(sys.modules[n].__spec__.loader).__name__) for n in sorted(new)])\n"
        "print(sys.path)\nprint(sorted(k for k, v in sys.path_importer_cache.items() if v is not None))\n",
    )
    out = subprocess.run(
        [sys.executable, "-I", "-S", "-c", probe], capture_output=True, text=True, cwd="/", check=True
    )
    new, path, listed = (eval(line) for line in out.stdout.splitlines())  # noqa: S307 - our own repr
    found = {n for n, loader in new if loader not in ("BuiltinImporter", "FrozenImporter", "type")}
    assert found == {"corevault", "corevault.bytecode"}
    here = os.path.dirname(os.path.dirname(bytecode.__file__))
    assert path.index(here) > max(i for i, p in enumerate(path) if p.startswith(sys.base_prefix))
    assert not [d for d in listed if d.endswith("lib-dynload")]


def test_a_module_from_the_compiled_modules_has_the_attributes_of_an_ordinary_import(tmp_path) -> None:
    launcher = hostsetup.isolated_launcher(str(tmp_path / hostsetup.LAUNCHER_NAME))
    with open(launcher) as f:
        text = f.read()
    names = ("corevault.spool", "corevault.capture")  # a module and a package
    show = (
        "[(m.__name__, m.__file__, m.__cached__, getattr(m, '__path__', None), m.__package__, "
        "m.__spec__.name, m.__loader__ is m.__spec__.loader, sorted(k for k in vars(m) if k.startswith('__')))"
        " for m in mods]"
    )
    probe = text.replace(
        "from corevault.capture.handler import main, quick_exit\nquick_exit(main())\n",
        f"import importlib\nmods = [importlib.import_module(n) for n in {names!r}]\n"
        f"print(type(mods[0].__loader__).__name__, {show})\n",
    )
    ordinary = probe.replace("bytecode.install(", "(")  # the same, without the compiled modules
    seen = [
        subprocess.run(
            [sys.executable, "-I", "-S", "-c", p], capture_output=True, text=True, cwd="/", check=True
        ).stdout.split(" ", 1)
        for p in (probe, ordinary)
    ]
    assert [loader for loader, _ in seen] == ["_Loader", "SourceFileLoader"]
    assert seen[0][1] == seen[1][1]


def test_a_changed_source_or_a_damaged_file_is_imported_the_ordinary_way(tmp_path) -> None:
    launcher = hostsetup.isolated_launcher(str(tmp_path / hostsetup.LAUNCHER_NAME))
    modules = launcher + hostsetup.BYTECODE_SUFFIX

    def grown(held: dict) -> None:  # as if corevault.spool's source were edited since
        source, package, (dev, ino, size, mtime_ns, ctime_ns), code, cached = held["corevault.spool"]
        held["corevault.spool"] = (source, package, (dev, ino, size + 1, mtime_ns, ctime_ns), code, cached)

    _rewrite(modules, grown)
    assert not bytecode.is_current(modules)
    loaders = _loaders(launcher)
    assert loaders["corevault.spool"] == "SourceFileLoader" and loaders["corevault.config"] == "_Loader"
    hostsetup.isolated_launcher(launcher)  # an install, or the agent's start, compiles it again
    assert bytecode.is_current(modules) and _loaders(launcher)["corevault.spool"] == "_Loader"

    with open(modules, "r+b") as f:
        f.truncate(os.path.getsize(modules) // 2)
    assert set(_loaders(launcher).values()) == {"SourceFileLoader"}
    with open(modules, "r+b") as f:
        f.seek(len(bytecode._FORMAT))
        f.write(b"\0\0")  # another Python's bytecode
    assert set(_loaders(launcher).values()) == {"SourceFileLoader"}


def _imported_value(tmp_path, modules: str) -> str:
    """What a fresh interpreter with the compiled modules at ``modules`` imports as ``cvmod.VALUE``."""
    probe = (
        f"import sys\nsys.path.insert(0, {str(tmp_path)!r})\nfrom corevault import bytecode\n"
        f"bytecode.install({modules!r})\nimport cvmod\nprint(cvmod.VALUE)\n"
    )
    env_path = os.path.dirname(os.path.dirname(bytecode.__file__))
    out = subprocess.run(
        [sys.executable, "-I", "-S", "-c", f"import sys; sys.path.append({env_path!r})\n" + probe],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


def test_a_source_replaced_with_its_size_and_mtime_kept_is_imported_from_its_source(tmp_path) -> None:
    """An upgrade that puts a source of the same size back with its mtime kept (``cp -p``,
    ``rsync -a``, ``tar x``, an image layer): the new source is what runs, not the code compiled
    from the old one; and a file of this format whose entries are not what it holds is not used."""
    source = tmp_path / "cvmod.py"
    source.write_text("VALUE = 'old'\n")
    modules = str(tmp_path / "modules")
    bytecode.write(modules, {"cvmod": str(source)})
    assert _imported_value(tmp_path, modules) == "old"  # taken from the compiled modules
    st = source.stat()
    replacement = tmp_path / "cvmod.py.new"
    replacement.write_text("VALUE = 'new'\n")
    os.utime(replacement, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.rename(replacement, source)
    assert (source.stat().st_size, source.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    assert not bytecode.is_current(modules)
    assert _imported_value(tmp_path, modules) == "new"

    with open(modules, "wb") as f:  # the right header, entries of another shape
        f.write(bytecode._FORMAT + bytecode.MAGIC_NUMBER + marshal.dumps({"cvmod": (str(source), False)}))
    assert not bytecode.install(modules)
    assert _imported_value(tmp_path, modules) == "new"


@pytest.mark.crash  # reads another process's mapped files, as only the handler may
def test_a_capture_walks_the_spool_once_also_when_it_stores_new_binaries(tmp_path, monkeypatch) -> None:
    """The spool's room for the core and the binary store's room (which counts the spool too)
    come from one walk of the spool; the first crash of new binaries used to walk it twice."""
    from corevault.capture import handler

    stage = Stage(tmp_path)
    walks: list[str] = []
    walk = spool.usage_by_owner
    monkeypatch.setattr(spool, "usage_by_owner", lambda d: walks.append(d) or walk(d))
    proc = subprocess.Popen(["sleep", "600"])
    pidfd = os.pidfd_open(proc.pid)
    read_end, write_end = os.pipe()
    deadline = time.monotonic() + 10
    while "libc" not in Path(f"/proc/{proc.pid}/maps").read_text() and time.monotonic() < deadline:
        time.sleep(0.01)  # its loader is still mapping: a mapping may go between maps and map_files
    try:
        os.write(write_end, b"\x7fELF" + bytes(4092))
        os.close(write_end)
        assert handler.capture(stage.settings, sleep_crash(proc.pid, pidfd), read_end, []) == 0
    finally:
        os.close(read_end)
        os.close(pidfd)
        proc.kill()
        proc.wait()
    [entry] = spool.entries(stage.settings.spool_dir)
    meta = spool.read_meta(stage.settings.spool_dir, entry)
    assert "new" in {m["stored"] for m in meta["modules"]}  # the store's room was asked
    assert walks == [stage.settings.spool_dir]


def test_the_spool_s_directories_are_made_only_when_a_step_finds_one_missing(tmp_path, monkeypatch) -> None:
    root = str(tmp_path / "spool")
    assert spool.made(root, lambda: os.mkdir(os.path.join(spool.tmp_dir(root), "e1"))) is None
    assert all(
        os.path.isdir(d) for d in (spool.ready_dir(root), spool.shipped_dir(root), spool.quarantine_dir(root))
    )

    def never(_: str) -> None:
        raise AssertionError("the directories were made again")

    monkeypatch.setattr(spool, "ensure", never)
    assert spool.made(root, lambda: 42) == 42
    monkeypatch.undo()
    os.rmdir(os.path.join(spool.tmp_dir(root), "e1"))
    os.rmdir(spool.tmp_dir(root))  # removed under a running node: the next step makes it again
    spool.made(root, lambda: os.mkdir(os.path.join(spool.tmp_dir(root), "e2")))
    assert os.listdir(spool.tmp_dir(root)) == ["e2"]


@pytest.mark.crash  # reads another process's mapped files, as only the handler may
def test_a_capture_into_a_spool_whose_directories_were_removed_makes_them_again(tmp_path) -> None:
    stage = Stage(tmp_path)
    stage.capture()
    shutil.rmtree(stage.settings.spool_dir)
    stage.capture()
    [entry] = spool.entries(stage.settings.spool_dir)
    assert spool.read_meta(stage.settings.spool_dir, entry)["core"]["size"] == 4096
    assert [r["event"] for r in spool.read_journal(stage.settings.spool_dir)] == ["captured"]
