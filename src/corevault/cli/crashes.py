"""``corevault list | info | dump | rm | gdb``: the crashes in the vault (groups: :mod:`corevault.cli.groups`).

Modelled on ``coredumpctl``: filters that narrow the list, ``--json`` on every read
command, one line and a distinct exit code for a missing id (4), a bad filter (2) or an
unreachable store (1).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime

import typer

from corevault import config, crashrecord
from corevault.errors import BadInput, NotFound, UserError
from corevault.printable import lines as printable_lines
from corevault.printable import printable
from corevault.vault.catalog import Filters

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def register(app: typer.Typer) -> None:
    app.command(
        "list",
        epilog="Examples: corevault list -n 20 · corevault list --namespace shop --signal SEGV --since 2d",
    )(list_)
    app.command(epilog="Example: corevault info 20261128T060502Z-4502-7bf6460b")(info)
    app.command(epilog="Example: corevault dump 20261128T060502Z-4502-7bf6460b -o core")(dump)
    app.command(epilog="Example: corevault rm 20261128T060502Z-4502-7bf6460b")(rm)
    app.command(
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
        epilog="Examples: corevault gdb ID · corevault gdb ID --batch -- -ex 'thread apply all bt'",
    )(gdb)


def source(ctx: typer.Context):  # -> CrashSource
    """The vault the crash commands work on: a server's (``--server``) or this machine's."""
    if ctx.obj.get("server"):
        from corevault.vault.remote import RemoteVault

        token = os.environ.get("COREVAULT_TOKEN")
        if ctx.obj.get("token_file"):
            try:
                with open(ctx.obj["token_file"]) as f:
                    token = f.read().strip()
            except OSError as e:
                raise UserError(f"token file {ctx.obj['token_file']}: {e.strerror}") from None
        return RemoteVault(ctx.obj["server"], token)
    from corevault.vault.crashes import LocalVault

    return LocalVault(config.load(ctx.obj["config"]))


def parse_time(value: str | None, what: str, now: float | None = None) -> int | None:
    """``2h``/``3d`` ago, epoch seconds, or an ISO date/time (UTC unless it says otherwise)."""
    if value is None:
        return None
    now = time.time() if now is None else now
    v = value.strip()
    if v[:-1].isdigit() and v[-1:] in UNITS:
        return int(now - int(v[:-1]) * UNITS[v[-1]])
    if v.isdigit():
        return int(v)
    try:
        parsed = datetime.fromisoformat(v)
    except ValueError:
        raise typer.BadParameter(
            f"{value!r}: use 30m, 2h, 7d, epoch seconds or 2026-11-28T06:00", param_hint=what
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return int(parsed.timestamp())


def _console():  # -> rich Console, wide enough for ids and titles when not on a terminal
    """A console that prints strings as they are: crashed processes name their executables and
    symbols, so a ``[/red]`` or ``:skull:`` in them is data, never markup or an emoji code."""
    from rich.console import Console

    return Console(highlight=False, markup=False, emoji=False, width=None if sys.stdout.isatty() else 200)


def _row(*cells: str) -> list[str]:
    """Table cells with every control character escaped (see :mod:`corevault.printable`)."""
    return [printable(c) for c in cells]


def _when(t: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t))


def list_(
    ctx: typer.Context,
    namespace: str = typer.Option(None, help="Only this namespace."),
    pod: str = typer.Option(None, help="Only this pod."),
    container: str = typer.Option(None, help="Only this container."),
    image: str = typer.Option(None, help="Only this image."),
    node: str = typer.Option(None, help="Only this node."),
    signal: str = typer.Option(None, help="Only this signal: SEGV, SIGABRT or 11."),
    exe: str = typer.Option(None, help="Only this executable path."),
    group: str = typer.Option(None, help="Only this crash group (signature)."),
    search: str = typer.Option(
        None, "--search", help="Words that must all appear in the title, frames, executable, pod or image."
    ),
    since: str = typer.Option(None, help="Newer than: 2h, 7d, epoch seconds or an ISO time."),
    until: str = typer.Option(None, help="Older than: the same forms."),
    limit: int = typer.Option(50, "-n", "--limit", min=1, max=10000, help="At most this many, newest first."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON lines."),
) -> None:
    """List crashes, newest first."""
    after, before = parse_time(since, "--since"), parse_time(until, "--until")
    if after is not None and before is not None and after >= before:
        raise BadInput(f"--since {since} is not before --until {until}: no crash can match both")
    filters = Filters(
        namespace=namespace, pod=pod, container=container, image=image, node=node, signal=signal, exe=exe,
        group=group, since=after, until=before, search=search,
    )  # fmt: skip
    rows = source(ctx).list(filters, limit)
    if as_json:
        for r in rows:
            print(json.dumps(r))
        return
    from rich.table import Table

    table = Table("TIME (UTC)", "ID", "NAMESPACE/POD", "CONTAINER", "SIG", "EXE", "SIZE", "WHAT", box=None)
    for r in rows:
        where = f"{r['namespace']}/{r['pod']}" if r["namespace"] else "-"
        size = f"{r['size'] / 1048576:.1f}M" + ("!" if r["truncated"] else "")
        table.add_row(*_row(
            _when(r["time"]), r["id"], where, r["container"] or "-", (r["signal_name"] or "?").removeprefix("SIG"),
            r["exe"] or "?", size, r["title"] or r["analysis"],
        ))  # fmt: skip
    _console().print(table)
    if not rows:
        print("no crashes match", file=sys.stderr)


def info(
    ctx: typer.Context,
    crash_id: str = typer.Argument(..., metavar="ID"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Everything known about one crash: where it happened, and its analysis."""
    try:
        crash = source(ctx).get(crash_id)
    except NotFound as e:
        raise NotFound(_in_the_spool(ctx, crash_id) or str(e)) from None
    if as_json:
        print(json.dumps(crash, indent=2, default=str))
        return
    meta = crashrecord.load(crash["meta"], crash["id"])
    pod, proc = meta["pod"], meta["process"]
    lines = [
        f"          ID: {crash['id']}",
        f"        Time: {_when(crash['time'])} UTC    node {crash['node']}",
        f"         Pod: {pod['namespace'] or '-'}/{pod['name'] or '-'} (uid {pod['uid'] or '-'})",
        f"   Container: {pod['container'] or '-'} ({(pod['container_id'] or '-')[:12]})  image {pod['image'] or '-'}",
        f"     Process: pid {proc['ns_pid']} (host {proc['pid']})  uid {proc['uid']}  {' '.join(proc['cmdline'])}",
        f"        Core: {crash['size']} bytes, {crash['stored_size']} stored" + ("  TRUNCATED" if crash["truncated"] else ""),
        f"      Volume: {meta['volume']['path'] or '-'}",
    ]  # fmt: skip
    print(printable_lines("\n".join(lines)))
    if crash["report"]:
        from corevault.analysis import render
        from corevault.model import Report

        print(render.text(Report.from_dict(crash["report"])))
    else:
        print(printable(
            f"    Analysis: {crash['analysis']}"
            + (f" ({crash['analysis_error']})" if crash["analysis_error"] else "")
        ))  # fmt: skip


def _in_the_spool(ctx: typer.Context, crash_id: str) -> str | None:
    """Where a crash this node captured but has not shipped is: its spool (the catalog has it later)."""
    if ctx.obj.get("server") or not crash_id or "/" in crash_id or crash_id in (".", ".."):
        return None
    from corevault import spool

    spool_dir = config.load(ctx.obj["config"]).spool_dir
    if os.path.isdir(os.path.join(spool.ready_dir(spool_dir), crash_id)):
        return f"crash {crash_id} is in this node's spool, not shipped yet: 'corevault analyze {crash_id}' reads it"
    if os.path.isdir(os.path.join(spool.quarantine_dir(spool_dir), crash_id)):
        return f"crash {crash_id} was set aside in the spool's quarantine: 'corevault status' says why"
    return None


def dump(
    ctx: typer.Context,
    crash_id: str = typer.Argument(..., metavar="ID"),
    output: str = typer.Option(
        ..., "-o", "--output", help="Where to write the plain core (- for standard output)."
    ),
    force: bool = typer.Option(False, "--force", help="Replace an existing file."),
) -> None:
    """Write a crash's plain core (decompressed, streamed) to a file."""
    src = source(ctx)
    size = src.get(crash_id)["size"]
    if output != "-" and os.path.exists(output) and not force:
        raise UserError(f"{output} exists; use --force to replace it")
    if output == "-":
        written = 0
        with src.open_core(crash_id) as reader:
            while chunk := reader.read(1 << 20):
                sys.stdout.buffer.write(chunk)
                written += len(chunk)
        sys.stdout.buffer.flush()
        _check_whole(crash_id, written, size, "what went to standard output is incomplete")
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    with Progress(
        BarColumn(), DownloadColumn(), TransferSpeedColumn(), transient=True, disable=not sys.stderr.isatty()
    ) as bar:
        task = bar.add_task("dump", total=size)
        try:
            write_core(src, crash_id, output, size, lambda n: bar.advance(task, n))
        except OSError as e:  # nothing was written: write_core leaves the path as it was
            raise UserError(
                f"cannot write the core to {output}: {e.strerror or e}; choose another -o"
            ) from None
    print(f"wrote {size} bytes to {output}", file=sys.stderr)


def write_core(src, crash_id: str, path: str, size: int | None, progress=None, outcome: str = "") -> None:
    """Write a crash's plain core to ``path`` as a sparse file, atomically (``src``: a CrashSource);
    a core that does not come out at the ``size`` its catalog row records leaves ``path`` as it was,
    and the error says ``outcome``."""
    from corevault import atomic
    from corevault.capture.stream import sparse_copy

    with atomic.replacing(path, 0o600) as f, src.open_core(crash_id) as reader:
        copied = sparse_copy(_VaultReads(reader, crash_id, path), f.fileno(), progress)
        _check_whole(crash_id, copied, size, outcome or f"{path} was left as it was")


class _VaultReads:
    """The core's reader, whose failures are the vault's (a store's disk, a broken connection), not
    the output file's: the callers take an ``OSError`` for a write to ``-o`` that failed."""

    def __init__(self, reader, crash_id: str, path: str) -> None:
        self.reader, self.crash_id, self.path = reader, crash_id, path

    def readinto(self, buf) -> int:
        try:
            return self.reader.readinto(buf)
        except OSError as e:
            raise UserError(
                f"cannot read the core of {self.crash_id} from the vault: {e.strerror or e}; "
                f"{self.path} was left as it was; run the command again"
            ) from None


def _check_whole(crash_id: str, written: int, size: int | None, outcome: str) -> None:
    # A zstd stream cut short reads as a short core, without an error: the vault's copy was
    # damaged (a store that lost its end, a disk error). Say so rather than hand out part of it.
    if size is not None and written != size:
        raise UserError(
            f"the vault's copy of the core of {crash_id} is damaged: it gives {written} bytes of the "
            f"{size} recorded; {outcome}"
        )


def rm(ctx: typer.Context, crash_ids: list[str] = typer.Argument(..., metavar="ID...")) -> None:
    """Remove crashes from the vault (their core, metadata, report and catalog rows)."""
    src = source(ctx)
    for crash_id in crash_ids:  # a mistyped id among several removes none of them
        src.get(crash_id)
    for crash_id in crash_ids:
        src.forget(crash_id)
        print(f"removed {crash_id}")


def gdb(
    ctx: typer.Context,
    crash_id: str = typer.Argument(..., metavar="ID"),
    batch: bool = typer.Option(False, "--batch", help="Run gdb in batch mode (add commands after --)."),
) -> None:
    """Open a crash in gdb with its own binaries (the files it mapped), after its pod and image are gone."""
    from corevault.analysis import binaries, elfcore, unwind_gdb

    src = source(ctx)
    crash = src.get(crash_id)
    tmp = tempfile.mkdtemp(prefix="corevault-gdb-")
    try:
        core = os.path.join(tmp, "core")
        write_core(src, crash_id, core, crash["size"], outcome="gdb was not started")
        parsed = elfcore.read(core)
        # Each object is the file this crash's process mapped (its record names key and
        # content), never whatever else claims the same build-id.
        record = {m["start"]: m for m in crashrecord.load(crash["meta"], crash["id"])["modules"]}
        found = {}
        for i, obj in enumerate(parsed.objects()):
            module = record.get(obj.start)
            if module is None or not module["key"]:
                continue
            dest = os.path.join(tmp, f"bin-{i}")
            if src.binary(crash_id, module, dest):
                bid = parsed.build_ids.get(obj.path)
                debuginfo = binaries.debug_file(bid, dest, [], binaries.DEBUG_DIRS)  # the host's packages
                found[obj.path] = binaries.Found(dest, debuginfo, module["key"], module["sha256"])
            else:
                print(
                    printable(
                        f"warning: no binary for {obj.path} ({module['key']}): gdb will show its frames without symbols"
                    ),
                    file=sys.stderr,
                )
        exe = found.get(parsed.executable or "")
        cmd = unwind_gdb.gdb_command(parsed, found, tmp, exe.executable if exe else None, batch=batch)
        if not batch:
            print(printable(f"corevault: {crash['title'] or crash['id']}"), file=sys.stderr)
        # Ctrl-C in gdb is gdb's (it stops a long backtrace and gives the prompt back): the terminal
        # sends it to this process too, which must neither die of it nor kill gdb. A handler that
        # does nothing, not SIG_IGN, which gdb would inherit.
        before = signal.signal(signal.SIGINT, lambda signum, frame: None)
        try:
            code = subprocess.run([*cmd, *ctx.args], check=False).returncode
        finally:
            signal.signal(signal.SIGINT, before)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    raise typer.Exit(code)
