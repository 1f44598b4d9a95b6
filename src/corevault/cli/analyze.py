"""``corevault analyze FILE|ID``: explain one core."""

from __future__ import annotations

import json
import os
import tempfile
from typing import TYPE_CHECKING

import typer

from corevault import config, nodestore, objectid, spool
from corevault.analysis import render, runner, upstream
from corevault.errors import BadInput, NotFound

if TYPE_CHECKING:
    from corevault.vault.blobs import BlobStore


def register(app: typer.Typer) -> None:
    app.command(
        epilog="Examples: corevault analyze /data/dump-a/core-!app!server-1-1700000000 · "
        "corevault analyze 20261128T060502Z-4502-7bf6460b --json"
    )(analyze)


def resolve(settings: config.Settings, what: str, tmp: str) -> tuple[str, list[str], list[dict] | None]:
    """The core to analyse, the stores to use and the crash's record of mapped objects.

    A spool entry or a vault crash has a record (its ``meta.json``), which names the very
    files its process mapped; a bare core file has none.
    """
    stores = [settings.buildid_dir]
    if os.path.exists(what):
        return what, stores, None
    if "/" not in what:
        for parent, kind in (
            (spool.ready_dir(settings.spool_dir), "ready"),
            (spool.shipped_dir(settings.spool_dir), "shipped"),
        ):
            entry = os.path.join(parent, what, spool.CORE_NAME)
            if os.path.exists(entry):
                return entry, stores, spool.read_meta(settings.spool_dir, what, kind).get("modules") or []
        from corevault.vault import blobs
        from corevault.vault.stores import vault_store

        vault = vault_store(settings)
        if isinstance(vault, blobs.FsStore):
            stores.append(vault.root)  # binaries by key and content, and kept debug files
        if vault.size(blobs.core_key(what)) is not None:
            path = os.path.join(tmp, spool.CORE_NAME)
            blobs.copy_to_file(vault, blobs.core_key(what), path)
            with vault.open(blobs.meta_key(what)) as f:
                record = json.loads(f.read()).get("modules") or []
            stores.append(_fetch_objects(vault, record, stores, os.path.join(tmp, "objects")))
            return path, stores, record
    where = f"the spool ({settings.spool_dir}) or the vault ({settings.vault_store})"
    error = runner.AnalysisError if "/" in what else NotFound  # a path, or a crash id (exit 4 as for info)
    raise error(f"{what} is not a core file, nor a crash in {where}")


def _fetch_objects(vault: BlobStore, record: list[dict], stores: list[str], dest: str) -> str:
    """Copy the vault's copies of the record's objects that no local store holds into ``dest``."""
    from corevault.vault import blobs

    for m in record:
        if not isinstance(m, dict) or not objectid.is_object(m.get("key"), m.get("sha256")):
            continue
        if any(nodestore.record_path(s, m) for s in stores):
            continue
        key = blobs.object_key(m["key"], m["sha256"])
        if vault.size(key) is None:
            continue
        path = nodestore.object_path(dest, m["key"], m["sha256"])
        os.makedirs(os.path.dirname(path), exist_ok=True)
        blobs.copy_to_file(vault, key, path)
    return dest


def analyze(
    ctx: typer.Context,
    what: str = typer.Argument(..., metavar="FILE|ID", help="A core file (plain or .zst) or a crash id."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    backend: str = typer.Option("drgn", help="Unwinder: drgn (default) or gdb."),
    store: list[str] = typer.Option([], help="More build-id stores to look in (debuginfod layout)."),
    timeout: float = typer.Option(
        runner.DEFAULT_TIMEOUT, min=0.001, help="Seconds before the analysis is stopped."
    ),
    system_debuginfo: bool = typer.Option(
        False, "--system-debuginfo", help="Also load libc's and other system libraries' DWARF (slower)."
    ),
) -> None:
    """Symbolized backtraces of every thread, the signal, and the crash's signature."""
    if backend not in ("drgn", "gdb"):
        raise BadInput(f"unknown backend {backend!r}; use drgn or gdb")
    settings = config.load(ctx.obj["config"])
    with tempfile.TemporaryDirectory(prefix="corevault-") as tmp:
        core, stores, record = resolve(settings, what, tmp)
        try:
            report = runner.analyze(
                core,
                [*store, *stores],
                backend,
                timeout=timeout,
                memory=settings.analysis_memory,
                system_debuginfo=system_debuginfo,
                debug_dirs=settings.debug_dirs,
                fetch=upstream.from_settings(settings),
                uid=settings.analysis_uid,
                uids=settings.analysis_uids,
                processes=settings.analysis_processes,
                record=record,
            )
        except runner.AnalysisError as e:  # say which of the user's files or crashes it was
            raise runner.AnalysisError(f"{what}: {e}") from None
    print(json.dumps(report.to_dict(), indent=2) if as_json else render.text(report))
