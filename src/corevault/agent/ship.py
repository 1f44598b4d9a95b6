"""Shipping the node spool into the vault, with nothing lost and nothing counted twice.

One spool entry goes through these steps, each safe to repeat after a crash of the agent
at any point (a SIGKILL included):

1. upload ``core.zst`` and ``meta.json`` (checked against what the store reports it holds);
2. with analysis off, upload the crash's binaries that the vault does not hold yet
   (``buildid/<key>/<sha256>``: by content, stored once for every crash that maps the same file);
3. insert the crash row (ignored if it is there), analysis ``pending``;
4. move the entry to the spool's ``shipped/`` (or remove it, when no analysis is due).

Entries ship in batches (:func:`ship_batch`): the small cores of a batch go up several at a
time, and the rows of every entry whose blobs are up go in one transaction, with one
multi-row statement per table (:func:`corevault.vault.catalog.add_crashes`), which is what
the catalog's cost per crash is made of at a fleet's scale. A kill before the commit leaves
no row and the batch is shipped again; after it, the rows are there and shipping again finds
them (nothing twice). An entry whose upload fails is left out of the transaction; when the
transaction fails, its entries are recorded one by one, so the one the database refuses
stays in the spool, retried, and the others land.

From then on the crash is in the catalog, whatever its analysis does: the analysis runs
apart (:mod:`corevault.agent.analyses`), and :func:`analyse_shipped` uploads the binaries
(step 2, off the shipping path: a pod's large binaries never keep another pod's crash out
of the catalog), stores ``report.json`` (not for a crash matched to its group's sample: that
one's report is the sample's, already stored), records signature and group (once), puts the
debug files the analysis fetched from upstream debuginfod servers into the vault too
(``buildid/<id>/<sha256>.debuginfo``, by the content of the object each was fetched for, so
corevault's own debuginfod serves them again to readers of crashes that mapped that content),
and only then removes the entry.

Nothing here parses a tenant's file without a bound: the binaries' section names are read
with :func:`corevault.elf.section_names`, and the analysis runs in a sandboxed worker.

Entries are locked with ``flock`` while shipped or analysed, so several agents (or a
restarted one) can share a spool. The journal is shipped by renaming it first (handlers
then start a new one), loading its lines into the catalog (each line once: its hash is the
key), and deleting the renamed file.

What a tenant's crash or an older handler put in the spool is data: text that is not valid
UTF-8 (an unpaired surrogate) reaches the catalog with U+FFFD in its place, the metadata blob
keeps it as written (JSON escapes it). Any error while shipping one entry or one journal line
is that entry's or line's alone: a :func:`transient` one (the vault away, a full disk) is
retried for as long as it lasts; any other counts towards setting it aside
(:func:`set_aside`, :func:`set_aside_line`) into the spool's ``quarantine/`` with its reason.
"""

from __future__ import annotations

import fcntl
import glob
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sqlalchemy import exc as sa_exc

from corevault import atomic, config, crashrecord, nodestore, objectid, printable, spool
from corevault.vault import blobs, catalog
from corevault.vault.crashes import LocalVault

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

    from corevault.crashrecord import CrashRecord
    from corevault.vault.recording import Match

log = logging.getLogger("corevault.agent")

DROPPED_EVENTS = frozenset({"dropped", "refused", "truncated", "error"})


class Busy(Exception):
    """Another agent is shipping this entry right now."""


#: cores up to this size (stored) go up several at once; a larger one goes alone, its parts
#: ``[vault.s3] concurrency`` at a time, so the agent never holds several large ones in memory
SMALL_CORE = 4 << 20


@dataclass
class Shipped:
    crash_id: str
    new: bool
    bytes: int
    seconds: float
    analysis: str


@dataclass
class Batch:
    """What became of each entry of a batch."""

    shipped: dict[str, Shipped] = field(default_factory=dict)
    #: why an entry was not shipped (it stays in the spool, to be tried again)
    failed: dict[str, Exception] = field(default_factory=dict)
    #: entries another agent holds or has shipped a moment ago
    busy: list[str] = field(default_factory=list)


#: errors that say nothing about the entry: the vault or the disk, away for a while
TRANSIENT = (blobs.StoreError, catalog.CatalogError, sa_exc.OperationalError, sa_exc.InterfaceError, OSError)


#: SQLSTATE classes that say the catalog itself is wrong or away, whatever row is written: an
#: agent and a catalog of different schemas (42: undefined table or column, privileges), a
#: connection or transaction lost (08, 40), no resources (53, 54), the server in a state (55, 57, 58,
#: XX). Counted towards the quarantine, they would set every entry of the node aside within a
#: minute of an upgrade gone wrong; the entry's own refusals are data (22) and constraints (23, P0).
SYSTEMIC_SQLSTATE = frozenset({"08", "40", "42", "53", "54", "55", "57", "58", "XX"})


def transient(error: BaseException) -> bool:
    """Whether ``error`` is worth retrying for as long as it lasts (else it counts towards the quarantine)."""
    if isinstance(error, TRANSIENT):
        return True
    sqlstate = getattr(getattr(error, "orig", None), "sqlstate", None)  # PostgreSQL's, through sqlalchemy
    return isinstance(sqlstate, str) and sqlstate[:2] in SYSTEMIC_SQLSTATE


def reason(error: BaseException) -> str:
    """``error`` in one printable line (a database's own message, without the statement and its values)."""
    error = getattr(error, "orig", None) or error  # sqlalchemy's wrapper of the driver's error
    text = " ".join(str(error).split()) or "no message"
    return printable.printable(f"{type(error).__name__}: {text}")[:500]


@dataclass
class _Entry:
    entry_id: str
    path: str
    #: as the handler wrote it (for the metadata blob)
    meta: dict
    record: CrashRecord
    #: the same with valid text only (for the catalog)
    clean: dict = field(default_factory=dict)
    size: int = 0
    #: how long its blobs took to go up
    seconds: float = 0.0


def ship_entry(vault: LocalVault, settings: config.Settings, entry_id: str) -> Shipped:
    """Ship one finished spool entry; raises on any failure and leaves the entry in place."""
    batch = ship_batch(vault, settings, [entry_id])
    if entry_id in batch.failed:
        raise batch.failed[entry_id]
    if entry_id in batch.busy:
        raise Busy(entry_id)
    return batch.shipped[entry_id]


def ship_batch(
    vault: LocalVault, settings: config.Settings, entry_ids: list[str], parallel: int = 1
) -> Batch:
    """Ship several finished entries: their blobs ``parallel`` at a time, their rows in one transaction.

    An entry that fails (its upload, its rows, its move) is left in place and named in
    :attr:`Batch.failed`; the others of the batch are shipped all the same. The catalog rows
    of the batch go in one transaction, retried one entry at a time when it fails, so that
    one entry's rows the database refuses never keep the others' out.
    """
    batch = Batch()
    with ExitStack() as held:
        entries = []
        for entry_id in entry_ids:
            path = os.path.join(spool.ready_dir(settings.spool_dir), entry_id)
            try:
                held.enter_context(_locked(path, entry_id))
                meta = spool.read_meta(settings.spool_dir, entry_id)  # kept as the handler wrote it
                clean = printable.valid_text(meta)
                if not isinstance(clean, dict):
                    raise ValueError(f"meta.json holds a {type(meta).__name__}, not an object")
                entries.append(_Entry(entry_id, path, meta, crashrecord.load(clean, entry_id), clean))
            except Busy:
                batch.busy.append(entry_id)
            except Exception as e:  # this entry's alone
                batch.failed[entry_id] = e
        # the small entries together; each large one after them, on its own: a large core never
        # keeps a small one's crash out of the catalog while it goes up
        small = [e for e in entries if _stored_size(e) <= SMALL_CORE]
        for group in [small, *([e] for e in entries if e not in small)]:
            uploaded = _upload_all(vault, settings, group, parallel, batch.failed)
            _record_all(vault, uploaded, "pending" if settings.agent_analyze else "off", batch)
            for entry in uploaded:
                done = batch.shipped.get(entry.entry_id)
                try:
                    if done is not None:
                        _finish(settings, entry.entry_id, done.analysis)
                except Exception as e:  # this entry's alone
                    del batch.shipped[entry.entry_id]
                    batch.failed[entry.entry_id] = e
    return batch


@contextmanager
def _locked(entry: str, entry_id: str) -> Iterator[None]:
    """Hold ``entry``'s flock; :class:`Busy` if another agent holds it or it is gone."""
    try:
        fd = os.open(entry, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise Busy(entry_id) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Busy(entry_id) from None
        if not os.path.exists(os.path.join(entry, spool.META_NAME)):
            raise Busy(entry_id)  # done and removed by another agent a moment ago
        yield
    finally:
        os.close(fd)


#: what the catalog may raise for a batch's rows (the database away, or refusing one entry's values)
RETRYABLE_ROWS = (catalog.CatalogError, sa_exc.DBAPIError)


def _upload_all(
    vault: LocalVault, settings: config.Settings, entries: list[_Entry], parallel: int,
    failed: dict[str, Exception],
) -> list[_Entry]:  # fmt: skip
    """Upload the entries' blobs, ``parallel`` at a time; those that went up, in id order."""
    done = []

    def one(entry: _Entry) -> None:
        try:
            _upload(vault, settings, entry)
            done.append(entry)
        except Exception as e:  # this entry's alone
            failed[entry.entry_id] = e

    if parallel > 1 and len(entries) > 1:
        with ThreadPoolExecutor(min(parallel, len(entries)), thread_name_prefix="corevault-ship") as pool:
            list(pool.map(one, entries))
    else:
        for entry in entries:
            one(entry)
    return sorted(done, key=lambda e: e.entry_id)


def _stored_size(entry: _Entry) -> int:
    try:
        return os.path.getsize(os.path.join(entry.path, spool.CORE_NAME))
    except OSError:
        return 0  # the upload says what is wrong


def _upload(vault: LocalVault, settings: config.Settings, entry: _Entry) -> None:
    """Steps 1 and 2 of one entry: its core and metadata, and (analysis off) its binaries."""
    started = time.monotonic()
    crash_id = entry.record["id"]
    stored = vault.store.put_file(blobs.core_key(crash_id), os.path.join(entry.path, spool.CORE_NAME))
    expected = entry.record["core"]["stored_size"]
    if expected >= 0 and stored.size != expected:
        raise blobs.StoreError(
            f"{entry.entry_id}: the spool holds {stored.size} bytes of core, its metadata says {expected}"
        )
    vault.store.put_bytes(blobs.meta_key(crash_id), json.dumps(entry.meta, indent=1, sort_keys=True).encode())
    if not settings.agent_analyze:
        _ship_objects(vault, settings, entry.record)  # otherwise with the analysis: see analyse_shipped
    entry.size, entry.seconds = stored.size, time.monotonic() - started


def _record_all(vault: LocalVault, entries: list[_Entry], analysis: str, batch: Batch) -> None:
    """Step 3 for ``entries``: in one transaction, or one by one when that fails."""
    if len(entries) > 1:
        try:
            _record(vault, entries, analysis, batch)
            return
        except Exception as e:  # told apart entry by entry next
            log.info("recording %d crashes at once failed (%s): recording them one by one", len(entries), e)
            for entry in entries:
                batch.shipped.pop(entry.entry_id, None)
    for entry in entries:
        try:
            _record(vault, [entry], analysis, batch)
        except Exception as e:  # this entry's, and only this entry's
            if not isinstance(e, RETRYABLE_ROWS):
                log.debug("cannot record %s", entry.entry_id, exc_info=True)
            batch.failed[entry.entry_id] = e


def _record(vault: LocalVault, entries: list[_Entry], analysis: str, batch: Batch) -> None:
    """Step 3 for ``entries``, in one transaction: their rows, and each crash's analysis state."""
    with vault.engine.begin() as conn:
        new = catalog.add_crashes(conn, [{**e.clean, "id": e.record["id"]} for e in entries], analysis)
        for e in entries:
            crash_id = e.record["id"]
            state = analysis if crash_id in new else catalog.analysis_state(conn, crash_id)
            batch.shipped[e.entry_id] = Shipped(
                crash_id, crash_id in new, e.size, e.seconds, state or "forgotten"
            )


def _finish(settings: config.Settings, entry_id: str, state: str) -> None:
    """Step 4: the entry to ``shipped/`` for its analysis, or removed."""
    entry = os.path.join(spool.ready_dir(settings.spool_dir), entry_id)
    shipped = os.path.join(spool.shipped_dir(settings.spool_dir), entry_id)
    if state == "pending" and not os.path.exists(shipped):
        os.rename(entry, shipped)
        return
    _remove(entry)  # not pending, or moved once already (this is a copy left by a restore)


def set_aside(settings: config.Settings, entry_id: str, why: str) -> bool:
    """Move a ready entry into the spool's ``quarantine/``, ``why`` beside it; False when another
    agent holds it or it is gone (it is that agent's now)."""
    entry = os.path.join(spool.ready_dir(settings.spool_dir), entry_id)
    try:
        with _locked(entry, entry_id):
            atomic.write(os.path.join(entry, spool.REASON_NAME), why + "\n", 0o600)
            os.makedirs(spool.quarantine_dir(settings.spool_dir), mode=0o700, exist_ok=True)
            os.rename(entry, os.path.join(spool.quarantine_dir(settings.spool_dir), entry_id))
    except Busy:
        return False
    atomic.fsync_dir(spool.ready_dir(settings.spool_dir))
    return True


def set_aside_line(settings: config.Settings, record: object, why: str) -> None:
    """Keep a journal line the catalog refused in ``quarantine/journal.jsonl``, ``why`` with it."""
    os.makedirs(spool.quarantine_dir(settings.spool_dir), mode=0o700, exist_ok=True)
    line = json.dumps({"reason": why, "record": record}, sort_keys=True) + "\n"  # ASCII: kept as written
    fd = os.open(
        os.path.join(spool.quarantine_dir(settings.spool_dir), spool.JOURNAL_NAME),
        os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
        0o600,
    )
    try:
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


#: what a removed entry is renamed to first (:func:`spool.entries` lists no hidden name)
REMOVED = ".removed-"


def _remove(entry: str) -> None:
    """Remove an entry's directory, out of sight first: a kill in the middle of a removal must
    not leave an entry that has lost its core but not its metadata (it would never ship)."""
    gone = os.path.join(os.path.dirname(entry), REMOVED + os.path.basename(entry))
    os.rename(entry, gone)
    shutil.rmtree(gone)


def _ship_objects(vault: LocalVault, settings: config.Settings, record: CrashRecord) -> None:
    """Upload the crash's mapped objects the vault lacks, by key and content hash."""
    wanted = {
        (m["key"], m["sha256"]): m for m in record["modules"] if objectid.is_object(m["key"], m["sha256"])
    }
    if not wanted:
        return  # no connection taken from the pool (each is checked with a round trip first)
    with vault.engine.connect() as conn:
        known = catalog.known_objects(conn, wanted)
    for key, sha in wanted.keys() - known:
        local = nodestore.record_path(settings.buildid_dir, wanted[key, sha])
        if local is None:
            continue  # the handler could not copy it (too large, no room): the record says so
        blob = blobs.object_key(key, sha)
        size = vault.store.size(blob)
        if size is None:
            size = vault.store.put_file(blob, local).size
        from corevault.analysis.binaries import has_dwarf

        with vault.engine.begin() as conn:
            catalog.add_object(conn, key, sha, size, debuginfo=has_dwarf(local))


def _ship_debuginfo(vault: LocalVault, settings: config.Settings, record: CrashRecord) -> None:
    """Keep in the vault the upstream debug files this node holds for the crash's modules."""
    if not settings.debuginfod_urls:
        return
    from corevault.analysis import upstream

    # by build-id and the content hash of the object mapped: the server gives it only to readers
    # of a crash that mapped that content (a pod's build-id is a claim, not a proof)
    for m in record["modules"]:
        build_id, sha = m["build_id"], m["sha256"]
        if not build_id or m["key"] != build_id or not objectid.is_object(build_id, sha):
            continue
        local = upstream.debuginfo_path(settings.debuginfo_dir, build_id, sha)
        key = blobs.debuginfo_key(build_id, sha)
        if os.path.exists(local) and vault.store.size(key) is None:
            vault.store.put_file(key, local)
            vault.store.delete(blobs.legacy_debuginfo_key(build_id))  # kept by build-id alone: never served


def analyse_shipped(
    vault: LocalVault, settings: config.Settings, entry_id: str, *, idle: bool = False
) -> str:
    """Analyse a shipped entry, record the outcome, remove the entry; returns the analysis state.

    ``idle``: no other entry waits for analysis, so a crash that could be matched is analysed
    in full while its group has fewer than ``group_samples`` samples (see :func:`_analyse`).
    Raises :class:`Busy` when another agent holds the entry, and leaves it in place on any
    failure to reach the vault, so that it is tried again.
    """
    entry = os.path.join(spool.shipped_dir(settings.spool_dir), entry_id)
    with _locked(entry, entry_id):
        record = crashrecord.load(spool.read_meta(settings.spool_dir, entry_id, "shipped"), entry_id)
        crash_id = record["id"]
        # A pod's binaries (a program of GiBs, say) go up here, not on the shipping path,
        # where they would keep every other pod's crash out of the catalog meanwhile.
        _ship_objects(vault, settings, record)
        with vault.engine.connect() as conn:
            state = catalog.analysis_state(conn, crash_id)
        if state == "pending":
            # only the objects this process mapped, as its capture recorded them
            modules = list(record["modules"])
            core = os.path.join(entry, spool.CORE_NAME)
            state = _analyse(vault, settings, crash_id, core, modules, idle=idle)
            _ship_debuginfo(vault, settings, record)
        _remove(entry)
        return state or "forgotten"


def _analyse(
    vault: LocalVault, settings: config.Settings, crash_id: str, core_path: str, record: list[dict],
    *, idle: bool,
) -> str:  # fmt: skip
    """Match the crash to its group's samples, or analyse it in full; returns the state recorded.

    Decided when the entry is taken, not when it was shipped: in a storm a group reaches its
    samples while its later crashes wait. ``match_after`` agreeing samples let a crash be
    matched; more samples, up to ``group_samples``, come from crashes taken when nothing else
    waits (``idle``), so a storm is drained by matching and a group's confidence still grows.
    """
    from corevault.analysis import runner, upstream

    with vault.engine.begin() as conn:
        needed = min(settings.match_after, settings.group_samples)
        match = catalog.match_sample(conn, crash_id, needed, settings.group_samples)
        if match is not None and not (idle and match.samples < settings.group_samples):
            # The same crash again, its group analysed enough: matched, not analysed, and
            # recorded in the transaction that found the match. Its report is the sample's,
            # whose report.json the vault holds already: the catalog row refers to it and no
            # copy is written per crash (a blob write, two fsyncs, of every crash of a loop).
            catalog.record_analysis(conn, crash_id, _matched(conn, match))
            return "matched"
    try:
        doc = runner.analyze(
            core_path,
            [settings.buildid_dir],
            timeout=settings.analysis_timeout,
            debug_dirs=settings.debug_dirs,
            fetch=upstream.from_settings(settings),
            memory=settings.analysis_memory,
            record=record,
            uid=settings.analysis_uid,
            uids=settings.analysis_uids,
            processes=settings.analysis_processes,
        ).to_dict()
    except runner.AnalysisError as e:
        log.warning("crash %s: analysis failed: %s", crash_id, e)
        with vault.engine.begin() as conn:
            catalog.record_analysis_failure(conn, crash_id, str(e))
        return "failed"
    vault.store.put_bytes(blobs.report_key(crash_id), json.dumps(doc).encode())
    with vault.engine.begin() as conn:
        catalog.record_analysis(conn, crash_id, doc)
    return "done"


def _matched(conn: Connection, match: Match) -> dict:
    """The report of a crash matched to its group's newest sample: the sample's, saying so."""
    sample = match.sample
    doc = catalog.report_of(conn, sample)
    if not isinstance(doc, dict):
        raise catalog.CatalogError(f"crash {sample}, the sample of a match, has no report")
    doc["matched"] = {"fingerprint": match.fingerprint, "sample": sample, "samples": match.samples}
    doc["warnings"] = [
        *doc.get("warnings", []),
        f"matched, not analysed: it crashed where crash {sample} did (the same program, signal and stack "
        f"top), whose stack this is; {match.samples} crashes of its group were analysed in full and agree "
        "([analysis] match_after)",
    ]
    return doc


def ship_journal(
    vault: LocalVault,
    settings: config.Settings,
    on_record: Callable[[dict], object] | None = None,
    refused: list[str] | None = None,
) -> dict[str, int]:
    """Move the journal's records of dropped, cut and refused dumps into the catalog.

    ``on_record`` sees every record (for Kubernetes Events). Returns how many records of
    each event were shipped (for metrics). A :func:`transient` error leaves the journal to
    the next pass; when the catalog refuses a file's records otherwise, they go one at a
    time, and each one it refuses on its own is set aside (:func:`set_aside_line`) and its
    reason added to ``refused``: the others land.
    """
    current = os.path.join(settings.spool_dir, spool.JOURNAL_NAME)
    if os.path.exists(current) and os.path.getsize(current) > 0:
        os.rename(current, os.path.join(settings.spool_dir, f"journal-{time.time_ns()}.shipping"))
    counts: dict[str, int] = {}
    for path in sorted(glob.glob(os.path.join(settings.spool_dir, "journal-*.shipping"))):
        records = []
        with open(path, "rb") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # a line cut by a full disk: nothing to keep
                if not isinstance(record, dict):
                    _refused_line(settings, record, "a journal line that is not a JSON object", refused)
                    continue
                event = record.get("event", "?")
                event = event if isinstance(event, str) else "?"
                counts[event] = counts.get(event, 0) + 1
                if event in DROPPED_EVENTS:
                    records.append(record)  # as written: set aside so if the catalog refuses it
                if on_record is not None:
                    try:
                        on_record(record)
                    except Exception as e:  # an Event is a courtesy: it never holds the journal up
                        log.warning("cannot pass on a journal record: %s", reason(e))
        try:
            with vault.engine.begin() as conn:
                for i in range(0, len(records), 500):
                    catalog.add_dropped(conn, [printable.valid_text(r) for r in records[i : i + 500]])
        except Exception as e:
            if transient(e):
                raise
            _journal_one_by_one(vault, settings, records, refused)
        os.unlink(path)
    return counts


def _journal_one_by_one(
    vault: LocalVault, settings: config.Settings, records: list[dict], refused: list[str] | None
) -> None:
    for record in records:
        try:
            with vault.engine.begin() as conn:
                catalog.add_dropped(conn, [printable.valid_text(record)])
        except Exception as e:  # this line's alone
            if transient(e):
                raise
            _refused_line(settings, record, reason(e), refused)


def _refused_line(settings: config.Settings, record: object, why: str, refused: list[str] | None) -> None:
    set_aside_line(settings, record, why)
    log.warning("set a journal line aside in %s: %s", spool.quarantine_dir(settings.spool_dir), why)
    if refused is not None:
        refused.append(why)


def clean_abandoned(settings: config.Settings, now: float | None = None) -> list[str]:
    """Remove spool entries a handler left half-written (it was killed or the node rebooted),
    and what is left of entries whose removal a kill cut short."""
    now = now or time.time()
    for where in (spool.ready_dir(settings.spool_dir), spool.shipped_dir(settings.spool_dir)):
        for name in os.listdir(where) if os.path.isdir(where) else []:
            if name.startswith(REMOVED):  # done with, its removal cut short by a kill
                shutil.rmtree(os.path.join(where, name), ignore_errors=True)
    removed = []
    tmp = spool.tmp_dir(settings.spool_dir)
    for name in os.listdir(tmp) if os.path.isdir(tmp) else []:
        path = os.path.join(tmp, name)
        if now - os.path.getmtime(path) > settings.timeout + 60:
            shutil.rmtree(path, ignore_errors=True)
            spool.journal(
                settings.spool_dir, {"event": "dropped", "reason": f"abandoned partial entry {name}"}
            )
            removed.append(name)
    return removed
