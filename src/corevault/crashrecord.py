"""The record of one crash, from the capture handler through the spool to the catalog and the API.

The capture handler writes it as a spool entry's ``meta.json``; the agent ships it; the
catalog keeps it whole (column ``meta``) and copies the fields it filters on into columns;
``corevault info`` and ``GET /api/v1/crashes/{id}`` show it, and the OpenAPI schema
describes it (:mod:`corevault.server.records` builds that schema from these classes). To
add a field: declare it here, write it in the handler, and say in :func:`load` what a
record written before it holds instead.

Versions (``version``; the capture handler writes :data:`corevault.capture.delivery.RECORD_VERSION`):

- 2: every field below is present (``snapshot`` is null unless the core is a snapshot).
- 1 and records without a version (the first handlers): fields added while version 1 was
  written may be missing (``handler_max_rss_kib``, ``process.environ``, the modules'
  ``go_build_id``, ``snapshot``…); ``fingerprint`` came with version 2 and reads as null
  where it is missing.

:func:`load` reads every version into the shape below, so readers index fields instead of
guessing; it keeps fields it does not know (a newer handler's), and it never raises: a
missing or mistyped value reads as unknown (None, ``-1``, ``""``, empty). What is stored
stays what the handler wrote.

At run time these classes only carry their annotations, as strings: ``typing`` costs the
capture handler several milliseconds per crash (``python -X importtime``), so it is
imported for type checkers only, and a record is a plain dict.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing
if TYPE_CHECKING:
    from typing import Any, NotRequired, TypedDict
else:
    TypedDict = dict


class Signal(TypedDict):
    number: int
    #: SIGSEGV…, or None for a number without a name
    name: str | None


class Process(TypedDict):
    """The crashed task, as the kernel's arguments and /proc told (-1: the kernel gave no value)."""

    #: in the host's PID namespace
    pid: int
    #: in the container's PID namespace
    ns_pid: int
    tid: int
    ns_tid: int
    uid: int
    gid: int
    fsuid: int
    fsgid: int
    comm: str
    exe: str
    #: secret-looking values redacted
    cmdline: list[str]
    #: the environment at exec, secret-looking values redacted
    environ: dict[str, str]
    hostname: str
    #: the kernel's dump mode: 0, 1, or 2 (a process that changed credentials)
    dump_mode: int
    #: soft RLIMIT_CORE in bytes, None when unlimited
    rlimit_core: int | None
    cpu: int


class Pod(TypedDict):
    """Who crashed: the pod and container, or nothing for a host process."""

    namespace: str | None
    name: str | None
    uid: str | None
    container: str | None
    container_id: str | None
    image: str | None
    #: where the annotations came from: podindex, oci, rules or none
    source: str


class Core(TypedDict):
    #: bytes of plain core read
    size: int
    truncated: bool
    #: at most this many bytes were kept, and what set that limit
    limit: int | None
    limit_source: str | None
    #: the size the core's headers promised, when the kernel stopped short of it
    expected_size: NotRequired[int]
    cut_by: NotRequired[str]
    #: of the plain core
    sha256: str
    #: bytes of the compressed file in the spool entry
    stored_size: int
    compression: str
    file: str


class Volume(TypedDict):
    """The plain core in the pod's own volume."""

    pattern: str | None
    #: inside the container's root
    path: str | None
    written: bool
    error: NotRequired[str]
    uid: NotRequired[int]
    gid: NotRequired[int]
    mode: NotRequired[str]


class Module(TypedDict):
    """One ELF object the process mapped, as captured (a build-id is the file's claim, not a proof)."""

    path: str
    start: int
    end: int
    build_id: str | None
    go_build_id: str | None
    #: the object's key in the store (a build-id, or a digest when it has none)
    key: str | None
    sha256: str | None
    size: int | None
    #: "new", "held" (already in the store), or why it was not stored
    stored: str | None


class Snapshot(TypedDict):
    """Why a live process was dumped, and for how long it was stopped."""

    reason: str
    requested_by: str
    kill: bool
    stopped_seconds: NotRequired[float | None]


class CrashRecord(TypedDict):
    """One crash: where it happened, the process, its core and the binaries it mapped."""

    version: int
    id: str
    node: str | None
    #: the kernel's time of the crash, epoch seconds
    time: int
    captured_at: float
    handler_seconds: float
    #: the handler's peak RSS
    handler_max_rss_kib: int | None
    signal: Signal
    process: Process
    pod: Pod
    cgroup: str | None
    core: Core
    volume: Volume
    modules: list[Module]
    #: where it crashed, cheaply (corevault.fingerprint); null when it has none (and in records
    #: written before it was taken)
    fingerprint: str | None
    warnings: list[str]
    problems: list[str]
    snapshot: Snapshot | None


#: every record class by name, parts before the classes that hold them
RECORDS: dict[str, type] = {
    c.__name__: c for c in (Signal, Process, Pod, Core, Volume, Module, Snapshot, CrashRecord)
}

_SCALARS: dict[str, tuple[type, ...]] = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}
_UNKNOWN: dict[str, object] = {"int": -1, "float": 0.0, "str": "", "bool": False}


def load(doc: object, entry_id: str | None = None) -> CrashRecord:
    """A crash record of any version (parsed JSON) in the current shape.

    ``entry_id`` is the id of a record that names none (its spool entry's name).
    """
    record = _fill(CrashRecord, doc)
    if "version" not in (doc if isinstance(doc, dict) else {}):
        record["version"] = 1
    if not record["id"] and entry_id:
        record["id"] = entry_id
    return record  # type: ignore[return-value]


def _fill(cls: type, doc: object) -> dict[str, Any]:
    out: dict[str, Any] = dict(doc) if isinstance(doc, dict) else {}
    for name, declared in cls.__annotations__.items():
        annotation = declared
        if declared.startswith("NotRequired["):
            if name not in out:
                continue  # a field that may be absent, and is
            annotation = declared[len("NotRequired[") : -1]
        out[name] = _value(annotation, out.get(name))
    return out


def _value(annotation: str, value: object) -> object:
    nullable = annotation.endswith(" | None")
    base = annotation.removesuffix(" | None")
    if value is None and nullable:
        return None
    if base in RECORDS:
        return _fill(RECORDS[base], value) if isinstance(value, dict) or not nullable else None
    if base.startswith("list["):
        item = base[5:-1]
        if not isinstance(value, list):
            return []
        return [_value(item, v) for v in value if item not in RECORDS or isinstance(v, dict)]
    if base.startswith("dict["):
        return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else {}
    kinds = _SCALARS[base]
    # bool is an int to Python, never to a record
    if isinstance(value, kinds) and (base == "bool" or not isinstance(value, bool)):
        return value
    return None if nullable else _UNKNOWN[base]
