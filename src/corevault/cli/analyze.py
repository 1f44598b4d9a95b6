"""``corevault analyze FILE|ID``: explain one core."""

from __future__ import annotations

import json
import os
import tempfile

import typer

from corevault import config, spool
from corevault.analysis import render, runner, upstream


def register(app: typer.Typer) -> None:
    app.command(
        epilog="Examples: corevault analyze /data/dump-a/core-!app!server-1-1700000000 · "
        "corevault analyze 20261128T060502Z-4502-7bf6460b --json"
    )(analyze)


def resolve(settings: config.Settings, what: str, tmp: str) -> tuple[str, list[str]]:
    """The core to analyse and the build-id stores to use: a file, a spool entry or a vault crash."""
    stores = [settings.buildid_dir]
    if os.path.exists(what):
        return what, stores
    if "/" not in what:
        for parent in (spool.ready_dir(settings.spool_dir), spool.shipped_dir(settings.spool_dir)):
            entry = os.path.join(parent, what, spool.CORE_NAME)
            if os.path.exists(entry):
                return entry, stores
        from corevault.vault import blobs

        vault = blobs.vault_store(settings)
        if isinstance(vault, blobs.FsStore):
            stores.append(vault.root)  # the vault's buildid/ tree is a debuginfod tree
        if vault.size(blobs.core_key(what)) is not None:
            path = os.path.join(tmp, spool.CORE_NAME)
            blobs.copy_to_file(vault, blobs.core_key(what), path)
            return path, stores
    where = f"the spool ({settings.spool_dir}) or the vault ({settings.vault_store})"
    raise runner.AnalysisError(f"{what} is not a core file, nor a crash in {where}")


def analyze(
    ctx: typer.Context,
    what: str = typer.Argument(..., metavar="FILE|ID", help="A core file (plain or .zst) or a crash id."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    backend: str = typer.Option("drgn", help="Unwinder: drgn (default) or gdb."),
    store: list[str] = typer.Option([], help="More build-id stores to look in (debuginfod layout)."),
    timeout: float = typer.Option(runner.DEFAULT_TIMEOUT, help="Seconds before the analysis is stopped."),
    system_debuginfo: bool = typer.Option(
        False, "--system-debuginfo", help="Also load libc's and other system libraries' DWARF (slower)."
    ),
) -> None:
    """Symbolized backtraces of every thread, the signal, and the crash's signature."""
    if backend not in ("drgn", "gdb"):
        raise runner.AnalysisError(f"unknown backend {backend!r}; use drgn or gdb")
    settings = config.load(ctx.obj["config"])
    with tempfile.TemporaryDirectory(prefix="corevault-") as tmp:
        core, stores = resolve(settings, what, tmp)
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
        )
    print(json.dumps(report.to_dict(), indent=2) if as_json else render.text(report))
