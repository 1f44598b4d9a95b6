"""The JSON API under ``/api/v1`` and the debuginfod endpoints.

A crash the reader may not see answers exactly as a crash that does not exist (404), and
lists and counts are made of visible crashes only, so nothing tells a reader that another
namespace had a crash. Asking for a namespace one may not see is a 403: that says nothing
about its crashes. Pages are cursor-paginated: ``next`` is an opaque cursor for the
following page, absent on the last.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from fastapi.responses import RedirectResponse
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from corevault import crashrecord, objectid, redact
from corevault.errors import BadInput
from corevault.server import records
from corevault.server.access import Principal
from corevault.server.ranges import accepts, serve
from corevault.vault import blobs, catalog, crashes, lifecycle, search, snapshots
from corevault.vault.crashes import encode_cursor, plain_frames, plain_range


class Problem(BaseModel):
    detail: str


_ERRORS: dict = {
    400: {"model": Problem, "description": "A parameter this server cannot use (a stale cursor)"},
    401: {"model": Problem, "description": "No token, or one the server does not accept"},
    403: {"model": Problem, "description": "A namespace you may not read, or an action you may not take"},
}
router = APIRouter(prefix="/api/v1", tags=["crashes"], responses=_ERRORS)
debuginfod = APIRouter(tags=["debuginfod"], responses=_ERRORS)

CrashQuery = Annotated[str | None, Query(description="The crash whose own mapped file to serve")]


def server(request: Request):  # -> corevault.server.app.Server
    return request.app.state.server


def principal(request: Request) -> Principal:
    return server(request).principal(request)


Reader = Annotated[Principal, Depends(principal)]

#: in a request's scope when its handler runs on the event loop (corevault.server.downloads)
ON_LOOP = "corevault.on_loop"


@contextlib.contextmanager
def reading(request: Request) -> Iterator[Any]:
    """The catalog for one download's lookup: the event loop's own prepared connection when the
    request is answered there, else a connection of the pool (in a worker thread, each its own)."""
    lookups = server(request).lookups
    if lookups is not None and request.scope.get(ON_LOOP):
        yield lookups
        return
    with server(request).vault.engine.connect() as conn:
        yield conn


class CrashSummary(BaseModel):
    id: str
    time: int
    node: str | None = None
    namespace: str | None = None
    pod: str | None = None
    container: str | None = None
    image: str | None = None
    signal: int | None = None
    signal_name: str | None = None
    exe: str | None = None
    size: int | None = None
    truncated: bool | None = None
    signature: str | None = None
    title: str | None = None
    #: pending, done, failed or off
    analysis: str


class CrashPage(BaseModel):
    items: list[CrashSummary]
    next: str | None = None


class Crash(CrashSummary):
    captured_at: float | None = None
    pod_uid: str | None = None
    container_id: str | None = None
    comm: str | None = None
    pid: int | None = None
    stored_size: int | None = None
    sha256: str | None = None
    analysis_error: str | None = None
    #: everything the capture handler recorded (secret-looking values redacted)
    meta: records.CrashRecord
    #: the analysis report (signal, threads and frames, modules, signature), once analysed
    report: dict[str, Any] | None = None


class ImageCount(BaseModel):
    #: null: crashes of processes outside any image (host processes)
    image: str | None = None
    count: int
    first_seen: int
    last_seen: int


class Group(BaseModel):
    signature: str
    title: str | None = None
    signal_name: str | None = None
    count: int
    first_seen: int
    last_seen: int
    namespaces: list[str]
    images: list[str]
    #: crashes on each of the last ``days`` days (UTC), oldest first
    daily: list[int]
    #: open, resolved, ignored or regressed
    state: str = "open"
    #: the images it crashed in, oldest first, with their counts
    per_image: list[ImageCount] = []
    first_image: str | None = None
    last_image: str | None = None
    #: the image it first crashed in, when that image's repository crashed earlier in another image
    new_in: str | None = None


class _Change(BaseModel):
    model_config = ConfigDict(extra="forbid")
    comment: str | None = Field(None, max_length=2000)


class Reopen(_Change):
    state: Literal["open"]


class Resolve(_Change):
    state: Literal["resolved"]
    #: only crashes of this image, or of images not seen before, regress it
    resolved_in: str | None = Field(None, max_length=512)


class Ignore(_Change):
    state: Literal["ignored"]
    #: until this time (epoch seconds)
    until: int | None = Field(None, ge=0, le=1 << 40)
    #: until this many more crashes
    crashes: int | None = Field(None, ge=1, le=1_000_000_000)


#: A new state for a crash group and its conditions.
StateChange = Annotated[Reopen | Resolve | Ignore, Field(discriminator="state")]


class HistoryEntry(BaseModel):
    time: float
    #: the reader who changed it, or "corevault"
    actor: str
    state: str
    resolved_in: str | None = None
    until: int | None = None
    crashes: int | None = None
    comment: str | None = None
    #: the crash that regressed or reopened it
    crash: str | None = None
    #: the namespaces whose state it changed ("" for host processes), of those you may read
    namespaces: list[str] = []


class NamespaceState(BaseModel):
    state: str
    since: float | None = None
    actor: str | None = None
    resolved_in: str | None = None
    ignore_until: int | None = None
    #: ignored until the group's count in this namespace reaches this
    ignore_until_count: int | None = None


class NamespaceStateOf(NamespaceState):
    #: "" for host processes
    namespace: str


class GroupState(NamespaceState):
    """The most urgent state of the namespaces you may read (regressed, open, ignored, resolved),
    and each one's own: a group's state is kept per namespace."""

    namespaces: list[NamespaceStateOf] = []


class GroupDetail(Group):
    status: GroupState
    history: list[HistoryEntry]
    #: whether you may change its state (update pods in a namespace it crashed in that you may read)
    may_change: bool
    #: the namespaces a state change of yours changes: those it crashed in that you may read and update
    changes_in: list[str] = []
    #: its newest crashes, newest first
    recent: list[CrashSummary]


class GroupPage(BaseModel):
    items: list[Group]
    next: str | None = None


def decode_cursor(cursor: str | None) -> tuple[int, str] | None:
    if cursor is None:
        return None
    try:
        return crashes.decode_cursor(cursor)
    except ValueError:
        raise HTTPException(400, "cursor: not one this server gave out; start again without it") from None


def _page(rows: list[dict], limit: int, key: tuple[str, str]) -> dict:
    """One page of ``rows`` (fetched with one more than ``limit``) and the cursor to the next, if any."""
    more = len(rows) > limit
    rows = rows[:limit]
    return {"items": rows, "next": encode_cursor(tuple(rows[-1][k] for k in key)) if more else None}


def _scope(reader: Principal, namespace: str | None) -> frozenset[str] | None:
    if namespace is not None and not reader.sees(namespace):
        raise HTTPException(403, f"you may not read namespace {namespace!r}")
    return reader.visible


Limit = Annotated[int, Query(ge=1, le=1000)]
Search = Annotated[
    str | None,
    Query(
        max_length=search.MAX_QUERY,
        pattern=search.PATTERN,
        description="Words (3 or more characters each, at most 8) that must all appear.",
    ),
]
_STATE = "(open|resolved|ignored|regressed)"


@contextlib.contextmanager
def _bad_search() -> Iterator[None]:
    try:
        yield
    except BadInput as e:  # a search text, a state, a signal the catalog cannot look for
        raise HTTPException(400, str(e)) from None


Epoch = Annotated[int | None, Query(ge=0, le=1 << 40, description="Seconds since the epoch.")]


@router.get("/crashes", response_model=CrashPage)
def list_crashes(
    request: Request,
    reader: Reader,
    namespace: str | None = None,
    pod: str | None = None,
    container: str | None = None,
    image: str | None = None,
    node: str | None = None,
    signal: Annotated[
        str | None,
        Query(description="SEGV, SIGSEGV or 11.", json_schema_extra={"pattern": catalog.SIGNAL_PATTERN}),
    ] = None,
    exe: str | None = None,
    group: Annotated[str | None, Query(description="A crash group's signature.")] = None,
    since: Epoch = None,
    until: Epoch = None,
    q: Search = None,
    limit: Limit = 50,
    cursor: str | None = None,
) -> dict:
    """Crashes, newest first; ``q`` keeps those whose title, frames, executable, pod or image hold every word."""
    filters = catalog.Filters(
        namespace=namespace, pod=pod, container=container, image=image, node=node, signal=signal, exe=exe,
        group=group, since=since, until=until, search=q or None, visible=_scope(reader, namespace),
    )  # fmt: skip
    with server(request).vault.engine.connect() as conn, _bad_search():
        rows = catalog.list_crashes(conn, filters, limit + 1, decode_cursor(cursor))
    return _page(rows, limit, ("search_key", "id") if q else ("time", "id"))


def visible_crash(request: Request, reader: Principal, crash_id: str) -> dict:
    """The crash, if it exists and ``reader`` may see it; a 404 that says the same either way."""
    with server(request).vault.engine.connect() as conn:
        crash = seen(reader, crash_id, catalog.get_crash(conn, crash_id))
    crash["meta"] = redact.meta(crashrecord.load(crash["meta"], crash_id))
    return crash


def seen(reader: Principal, crash_id: str, crash: dict | None) -> dict:
    """``crash`` (a catalog row, or None) if ``reader`` may see it; else the same 404 as for none."""
    if crash is None or not reader.sees(crash["namespace"]):
        raise HTTPException(404, f"no crash {crash_id!r}")
    return crash


@router.get(
    "/crashes/{crash_id}",
    response_model=Crash,
    responses={404: {"model": Problem, "description": "No such crash"}},
)
def get_crash(request: Request, reader: Reader, crash_id: str) -> dict:
    """One crash: where it happened, what the capture handler recorded, and its analysis."""
    return visible_crash(request, reader, crash_id)


@router.head("/crashes/{crash_id}/core", include_in_schema=False)
@router.get(
    "/crashes/{crash_id}/core",
    response_class=Response,
    responses={
        200: {
            "content": {"application/octet-stream": {}},
            "description": "The plain core (zstd-encoded, Content-Encoding: zstd, to a client that accepts it)",
        },
        206: {"content": {"application/octet-stream": {}}, "description": "One byte range of it"},
        404: {"model": Problem, "description": "No such crash"},
        416: {"description": "The range starts past the end"},
    },
)
def download_core(request: Request, crash_id: str) -> Response:
    """The plain core; as it is stored (``Content-Encoding: zstd``) to a client that accepts zstd
    and asks for no range; supports a single HTTP Range, always of the plain core."""
    # the reader is found here (not as a dependency, one more thread hop: see
    # corevault.server.downloads for where this runs), and the crash is one row of five
    # columns: a reader of ranges asks for each range anew
    reader, srv = principal(request), server(request)
    with reading(request) as conn:
        crash = seen(reader, crash_id, catalog.core_of(conn, crash_id))
    store, key = srv.vault.store, blobs.core_key(crash_id)
    vary = {"Vary": "Accept-Encoding"}
    if (
        crash["stored_size"]
        and "range" not in request.headers
        and accepts(request.headers.get("accept-encoding"), "zstd")
    ):
        # The stored core is zstd frames (and a seek table, a skippable frame every decoder
        # passes over): sent as it lies, by the kernel from a file store, or fetched by the reader
        # from an object store that answers with the encoding; the reader decompresses.
        presign = getattr(store, "presign", None)
        if request.method == "GET" and presign is not None and (url := presign(key, "zstd")) is not None:
            srv.metrics.bytes.labels("core-redirected").inc(crash["stored_size"])
            return RedirectResponse(url, status_code=307, headers=vary)
        local = getattr(store, "local_path", None)
        return serve(
            request,
            lambda start, end: store.open(key, start),
            crash["stored_size"],
            filename=f"core-{crash_id}",
            etag=f"{crash['sha256']}.zst" if crash["sha256"] else None,
            headers={**vary, "Content-Encoding": "zstd"},
            counted=srv.metrics.bytes.labels("core").inc,
            local=local(key) if local is not None else None,
        )
    return serve(
        request,
        lambda start, end: plain_range(store, crash, start, end),
        crash["size"] or 0,
        filename=f"core-{crash_id}",
        etag=crash["sha256"],
        headers=vary,
        counted=srv.metrics.bytes.labels("core").inc,
        frames=lambda start, end: plain_frames(store, crash, start, end),
    )


@router.get(
    "/crashes/{crash_id}/report",
    responses={
        200: {"content": {"application/json": {}, "text/plain": {}}, "description": "The analysis report"},
        404: {"model": Problem, "description": "No such crash, or not analysed"},
    },
)
def download_report(
    request: Request, reader: Reader, crash_id: str, format: Literal["json", "text"] = "json"
) -> Response:
    """The analysis report, as JSON or as the text ``corevault info`` prints."""
    crash = visible_crash(request, reader, crash_id)
    if crash["report"] is None:
        raise HTTPException(404, f"crash {crash_id!r} has no report (analysis {crash['analysis']})")
    if format == "text":
        from corevault.analysis import render
        from corevault.model import Report

        body, media = render.text(Report.from_dict(crash["report"])) + "\n", "text/plain; charset=utf-8"
    else:
        body, media = json.dumps(crash["report"], indent=1), "application/json"
    disposition = f'attachment; filename="report-{crash_id}.{"txt" if format == "text" else "json"}"'
    return Response(body, media_type=media, headers={"Content-Disposition": disposition})


@router.delete(
    "/crashes/{crash_id}",
    status_code=204,
    responses={404: {"model": Problem, "description": "No such crash"}},
)
def delete_crash(request: Request, reader: Reader, crash_id: str) -> Response:
    """Remove a crash: its core, metadata, report and catalog rows."""
    crash = visible_crash(request, reader, crash_id)
    if not reader.allowed("delete", crash["namespace"]):
        raise HTTPException(403, f"you may read but not remove crashes of namespace {crash['namespace']!r}")
    server(request).vault.forget(crash_id)
    return Response(status_code=204)


@router.get("/groups", response_model=GroupPage)
def list_groups(
    request: Request,
    reader: Reader,
    namespace: str | None = None,
    image: str | None = None,
    signal: Annotated[
        str | None,
        Query(description="SEGV, SIGSEGV or 11.", json_schema_extra={"pattern": catalog.SIGNAL_PATTERN}),
    ] = None,
    since: Annotated[
        int | None, Query(ge=0, le=1 << 40, description="Last seen at or after (epoch).")
    ] = None,
    days: Annotated[int, Query(ge=1, le=365, description="Days of daily counts.")] = 14,
    state: Annotated[
        str | None,
        Query(
            pattern=rf"^(all|{_STATE}(,{_STATE})*)$",
            description="Comma-separated states, or all; by default open,regressed (what needs attention).",
        ),
    ] = None,
    q: Search = None,
    new_in: Annotated[str | None, Query(description="Only groups new in this image.")] = None,
    limit: Limit = 50,
    cursor: str | None = None,
) -> dict:
    """Crash groups (signatures), most recently seen first, counted over the namespaces you may read."""
    visible = _scope(reader, namespace)
    with server(request).vault.engine.connect() as conn, _bad_search():
        states = lifecycle.parse_states(state)
        rows = catalog.list_groups(
            conn, limit + 1, visible=visible, namespace=namespace, image=image, signal=signal, since=since,
            before=decode_cursor(cursor), days=days, states=states, search=q or None, new_in=new_in,
        )  # fmt: skip
    return _page(rows, limit, ("last_seen", "signature"))


state_change = TypeAdapter(StateChange)
_NO_GROUP = {404: {"model": Problem, "description": "No such group, or none of its crashes visible to you"}}


def group_detail(request: Request, reader: Principal, signature: str) -> dict:
    """The group as ``reader`` sees it; a 404 when it may see none of its crashes."""
    with server(request).vault.engine.connect() as conn:
        group = catalog.group_detail(conn, signature, reader.visible)
        if group is None:
            raise HTTPException(404, f"no crash group {signature!r}")
        crashed_in = lifecycle.group_namespaces(conn, signature)
    group["changes_in"] = changes_in(reader, crashed_in)
    group["may_change"] = bool(group["changes_in"])
    return group


def changes_in(reader: Principal, crashed_in: list[str]) -> list[str]:
    """The namespaces of a group whose state ``reader`` changes: those it crashed in that the
    reader may both read and update (a group's state is kept per namespace)."""
    visible = reader.visible
    return [
        ns for ns in crashed_in if (visible is None or ns in visible) and reader.allowed("update", ns or None)
    ]


@router.get("/groups/{signature}", response_model=GroupDetail, responses=_NO_GROUP)
def get_group(request: Request, reader: Reader, signature: str) -> dict:
    """One crash group: counts, per-image table, state and its history, its newest crashes."""
    return group_detail(request, reader, signature)


def change_state(
    request: Request, reader: Principal, signature: str, change: Reopen | Resolve | Ignore
) -> dict:
    group = group_detail(request, reader, signature)
    if not group["may_change"]:
        raise HTTPException(
            403,
            "you may not change this group's state: that needs update on pods in a namespace "
            "it crashed in (or a token with update = true for it)",
        )
    want = lifecycle.Change(**change.model_dump())
    with server(request).vault.engine.begin() as conn, _bad_search():
        lifecycle.change(conn, signature, want, reader.name, namespaces=group["changes_in"])
    return group_detail(request, reader, signature)


@router.post("/groups/{signature}/state", response_model=GroupDetail, responses=_NO_GROUP)
def set_state(request: Request, reader: Reader, signature: str, change: StateChange) -> dict:
    """Resolve, ignore or reopen a crash group; who did it and when is kept in its history."""
    return change_state(request, reader, signature, change)


#: a Kubernetes object name (RFC 1123 subdomain)
_NAME = r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$"


class SnapshotRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    namespace: str = Field(pattern=_NAME, max_length=253)
    pod: str = Field(pattern=_NAME, max_length=253)
    #: the container whose first process is snapshotted; needed when the pod has several
    container: str | None = Field(None, pattern=_NAME, max_length=253)
    #: kill the process once its core is kept
    kill: bool = False
    reason: str = Field("", max_length=2000)


class SnapshotStatus(BaseModel):
    id: str
    time: float
    namespace: str
    pod: str
    container: str | None = None
    kill: bool
    reason: str
    requested_by: str
    #: pending (no node took it yet), running, done, failed, or expired (no node claimed it)
    state: Literal["pending", "running", "done", "failed", "expired"]
    node: str | None = None
    #: the crash id of the snapshot in this vault (its report is there once analysed)
    crash_id: str | None = None
    #: where the plain core went in the pod's volume
    volume: str | None = None
    error: str | None = None
    finished: float | None = None


_NO_SNAPSHOT = {404: {"model": Problem, "description": "No such snapshot request"}}


@router.post("/snapshots", response_model=SnapshotStatus, status_code=202, tags=["snapshots"])
def request_snapshot(request: Request, reader: Reader, want: SnapshotRequest) -> dict:
    """Ask the node that runs a pod for a core of its live process; poll the answer's id.

    Allowed to readers who may ``create pods/exec`` on that pod (a static token with ``exec = true``).
    """
    if not reader.may_exec(want.namespace, want.pod):
        raise HTTPException(
            403, f"you may not exec into pod {want.namespace}/{want.pod}, so you may not snapshot it"
        )
    with server(request).vault.engine.begin() as conn:
        rid = snapshots.request(
            conn, want.namespace, want.pod, want.container, kill=want.kill, reason=want.reason, by=reader.name
        )
        return snapshots.get(conn, rid) or {}


@router.get("/snapshots/{rid}", response_model=SnapshotStatus, responses=_NO_SNAPSHOT, tags=["snapshots"])
def snapshot_status(request: Request, reader: Reader, rid: str) -> dict:
    """Where a snapshot request stands, and where its core and report are once it is done."""
    with server(request).vault.engine.connect() as conn:
        doc = snapshots.get(conn, rid)
    if doc is None or not (reader.sees(doc["namespace"]) or reader.may_exec(doc["namespace"], doc["pod"])):
        raise HTTPException(404, f"no snapshot request {rid!r}")
    return doc


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}},
)
def triage_metrics(request: Request, reader: Reader, namespace: str | None = None) -> Response:
    """Crash groups per namespace and state, and group events, over the namespaces you may read (Prometheus)."""
    from prometheus_client import CONTENT_TYPE_LATEST

    from corevault.alerts import metrics

    visible = _scope(reader, namespace)
    with server(request).vault.engine.connect() as conn:
        body = metrics.exposition(conn, visible, namespace)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


@router.get("/namespaces", response_model=list[str])
def list_namespaces(request: Request, reader: Reader) -> list[str]:
    """The namespaces with crashes that you may read."""
    return [ns for ns in server(request).namespaces() if reader.sees(ns)]


_BINARY: dict = {
    200: {"content": {"application/octet-stream": {}}, "description": "The ELF file"},
    206: {"content": {"application/octet-stream": {}}, "description": "One byte range of it"},
    404: {"model": Problem, "description": "Not held, or used by no crash you may read"},
}


def _binary(request: Request, build_id: str, debuginfo: bool, crash: str | None) -> Response:
    # A build-id is a claim any pod can make: the file served is one that a crash the reader
    # may read really mapped (that crash's own, with ?crash=ID), never another tenant's.
    # Everything a download needs before its bytes (the reader, the lookup, opening the file)
    # happens in this one call, in one worker thread or on the event loop when all of it is
    # local (corevault.server.downloads): a debugger asks for dozens of files per core.
    reader = principal(request)
    if not objectid.KEY.match(build_id):
        raise HTTPException(404, "not a build-id")
    srv = server(request)
    with reading(request) as conn:
        row = catalog.object_for(conn, build_id, reader.visible, crash)
    key, size = (blobs.object_key(row["key"], row["sha256"]), row["size"]) if row else ("", 0)
    if row is not None and debuginfo:
        # a separate debug file fetched from an upstream debuginfod (checked by build-id there) for
        # the very content a crash the reader may read mapped, never one fetched for another
        # content claiming the build-id (another tenant's, whose private symbols it may hold)
        fetched = (
            srv.vault.store.size(blobs.debuginfo_key(build_id, row["sha256"])) if row["sha256"] else None
        )
        if fetched is not None:
            key, size = blobs.debuginfo_key(build_id, row["sha256"]), fetched
        elif not row["debuginfo"]:
            row = None
    if row is None:
        raise HTTPException(404, f"no {'debuginfo' if debuginfo else 'executable'} for build-id {build_id}")
    store = srv.vault.store
    # The reader may have the file: from an object store it fetches it itself, from a URL of
    # one minute (curl -L, libdebuginfod's clients: gdb, eu-stack, drgn, and corevault's CLI follow).
    presign = getattr(store, "presign", None)
    if request.method == "GET" and presign is not None and (url := presign(key)) is not None:
        srv.metrics.bytes.labels("debuginfod-redirected").inc(size)
        return RedirectResponse(url, status_code=307, headers={"X-Debuginfod-Size": str(size)})
    local = getattr(store, "local_path", None)
    return serve(
        request,
        lambda start, end: store.open(key, start),
        size,
        filename=build_id + (".debug" if debuginfo else ""),
        headers={"X-Debuginfod-Size": str(size)},
        counted=srv.metrics.bytes.labels("debuginfod").inc,
        local=local(key) if local is not None else None,
    )


@debuginfod.head("/buildid/{build_id}/executable", include_in_schema=False)
@debuginfod.get("/buildid/{build_id}/executable", response_class=Response, responses=_BINARY)
def executable(request: Request, build_id: str, crash: CrashQuery = None) -> Response:
    """The executable or shared library with this build-id (or ``go-…``/``sha256-…`` key), as a
    crashing process you may read mapped it: with ``crash``, that crash's own file."""
    return _binary(request, build_id, False, crash)


@debuginfod.head("/buildid/{build_id}/debuginfo", include_in_schema=False)
@debuginfod.get("/buildid/{build_id}/debuginfo", response_class=Response, responses=_BINARY)
def debuginfo(request: Request, build_id: str, crash: CrashQuery = None) -> Response:
    """The separate debug file fetched from an upstream debuginfod for the content a crashing process
    you may read mapped (with ``crash``, that crash's own), or the executable itself when it carries
    DWARF (built with -g and not stripped)."""
    return _binary(request, build_id, True, crash)
