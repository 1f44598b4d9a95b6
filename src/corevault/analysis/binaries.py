"""Finding a crash's binaries and debug info: through the crash's own record, never a global claim.

A container's libc is not the host's, and an image may be gone by the time someone
looks: the capture handler copied every mapped ELF object into the node's store, by key
and content (``<store>/buildid/<key>/<sha256>``, see :mod:`corevault.objectid`), and
recorded both for each object in the crash's ``meta.json``. A build-id is only a claim,
so a crash that has such a record gets exactly the files its process mapped, whatever
other pods stored under the same build-id.

A bare core file has no record. Then the files stored under the key the core's memory
claims are candidates; one is used only if its build-id matches and its first page is
the one the kernel dumped into the core; when different contents still qualify, none is
used and the report says why (analyse the crash by its id instead).

Debug info is looked for in the file itself (built with ``-g``), in the host's standard
separate-debug tree (``/usr/lib/debug/.build-id/xx/rest.debug``, the host's own
packages) and in stores: ``buildid/<id>/<sha256>.debuginfo``, fetched from an upstream
server for the object of that content (:mod:`corevault.analysis.upstream`) and used only
for that content, else ``buildid/<id>/debuginfo`` of a tree a user points at. Every
candidate's build-id is read and compared before it is used (gdb would use a wrong libc
silently).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from corevault import elf, nodestore, objectid
from corevault.analysis.elfcore import Core

DEBUG_DIRS = ("/usr/lib/debug",)
PAGE = 4096


@dataclass(frozen=True, slots=True)
class Found:
    executable: str | None
    debuginfo: str | None
    #: the key that found the executable (build-id, ``go-…`` or ``sha256-…``)
    key: str | None = None
    #: SHA-256 of the executable: the record's, or for a bare core the stored file's name
    sha256: str | None = None


def _file_ids(path: str) -> tuple[str | None, str | None] | None:
    """``(GNU build-id, Go build id)`` the file at ``path`` claims; None if it is unreadable or not ELF."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return elf.build_ids(lambda offset, size: os.pread(fd, size, offset))
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)


def file_build_id(path: str) -> str | None:
    ids = _file_ids(path)
    return ids[0] if ids else None


def file_key(path: str) -> str | None:
    """The key a stored file claims by its own notes (GNU build-id, else Go's), if any."""
    ids = _file_ids(path)
    return objectid.key_for(*ids, None) if ids else None


def has_dwarf(path: str) -> bool:
    """Whether an ELF file carries DWARF (a ``.debug_info`` section).

    Read with :func:`corevault.elf.section_names`, which is bounded: the agent asks this of
    every binary a tenant's crash mapped, in its own process.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        names = elf.section_names(lambda offset, size: os.pread(fd, size, offset))
    except (OSError, ValueError, struct.error):
        return False
    finally:
        os.close(fd)
    return names is not None and ".debug_info" in names


def debug_file(
    build_id: str | None,
    executable: str | None,
    stores: list[str],
    debug_dirs: tuple[str, ...],
    sha256: str | None = None,
) -> str | None:
    """Separate debug info for ``build_id`` (stores, then the host's tree), else the file's own DWARF.

    ``sha256``: the content of the object mapped; a debug file fetched for that content is
    used, never one fetched for another content claiming the same build-id."""
    if build_id and objectid.KEY.match(build_id):
        names = [sha256 + ".debuginfo"] if sha256 and objectid.is_object(build_id, sha256) else []
        for base in [os.path.join(s, nodestore.BUILDID) for s in stores]:
            for name in [*names, "debuginfo"]:
                candidate = os.path.join(base, build_id, name)
                if file_build_id(candidate) == build_id:
                    return candidate
        for base in debug_dirs:
            candidate = os.path.join(base, ".build-id", build_id[:2], build_id[2:] + ".debug")
            if file_build_id(candidate) == build_id:
                return candidate
    if executable is not None and has_dwarf(executable):
        return executable
    return None


def locate(build_id: str, stores: list[str], debug_dirs: tuple[str, ...] = DEBUG_DIRS) -> Found:
    """The one file held for ``build_id`` in ``stores`` (checked against it), and its debug info.

    For trees a user points at (debuginfod layout) and bare cores; a file of another
    content under the same build-id makes the answer ambiguous, and nothing is used.
    """
    executable = _single(build_id, stores, None)
    debuginfo = debug_file(build_id, executable, stores, debug_dirs)
    return Found(executable, debuginfo, build_id if executable else None)


def resolve(
    core: Core, stores: list[str], record: list[dict] | None, debug_dirs: tuple[str, ...] = DEBUG_DIRS
) -> tuple[dict[str, Found], list[str]]:
    """The files for each mapped object of ``core`` (by path), and warnings.

    ``record`` is the crash's list of mapped objects (``meta.json``'s ``modules``), or None
    for a bare core.
    """
    warnings: list[str] = []
    by_start = {m.get("start"): m for m in record or [] if isinstance(m, dict)}
    found: dict[str, Found] = {}
    for obj in core.objects():
        claim = core.keys.get(obj.path)
        bid = core.build_ids.get(obj.path)
        executable = sha = key = None
        if record is not None:
            entry = by_start.get(obj.start)
            if entry is not None:
                key, sha = entry.get("key"), entry.get("sha256")
                executable = next(filter(None, (nodestore.record_path(s, entry) for s in stores)), None)
                if executable is not None and claim and file_key(executable) != claim:
                    warnings.append(f"{obj.path}: the stored file lacks the key the core names; not used")
                    executable = None
        elif claim:
            first = core.read_memory(obj.start, PAGE)
            executable = _single(claim, stores, first, warnings, obj.path)
            key = claim if executable else None
            # the capture names a stored file by its content hash
            name = os.path.basename(executable) if executable else ""
            sha = name if objectid.SHA256.match(name) else None
        if executable is None and key is None and claim is None:
            continue  # not an ELF object with an identity (data files, the vdso without notes…)
        if not isinstance(sha, str) or not objectid.SHA256.match(sha):
            sha = None
        debuginfo = debug_file(bid, executable, stores, debug_dirs, sha)
        if executable is None:
            key = sha = None
        found[obj.path] = Found(executable, debuginfo, key, sha)
    return found, warnings


def _single(
    key: str, stores: list[str], first_page: bytes | None, warnings: list[str] | None = None, what: str = ""
) -> str | None:
    """The stored file under ``key`` whose own key matches (and first page, if given); None if not one."""
    chosen: dict[str, str] = {}  # content fingerprint -> path
    for store in stores:
        for path in nodestore.candidates(store, key):
            if file_key(path) != key:
                continue
            try:
                with open(path, "rb") as f:
                    head = f.read(PAGE)
            except OSError:
                continue
            if first_page is not None and head[: len(first_page)] != first_page[: len(head)]:
                continue
            name = os.path.basename(path)
            chosen.setdefault(name if objectid.SHA256.match(name) else _sha256(path), path)
    if len(chosen) > 1:
        if warnings is not None:
            warnings.append(
                f"{what}: {len(chosen)} different files claim {objectid.kind(key)} {key}; none is used "
                "(analyse the crash by its id: its own record names the file its process mapped)"
            )
        return None
    return next(iter(chosen.values()), None)


def _sha256(path: str) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
