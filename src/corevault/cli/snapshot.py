"""``corevault snapshot PID | --pod NS/NAME``: a core of a live process, kept like a crash."""

from __future__ import annotations

import dataclasses
import errno
import getpass
import json
import os
import socket

import typer

from corevault import config
from corevault.capture import snapshot as snap
from corevault.errors import BadInput, UserError
from corevault.printable import printable


class SnapshotFailed(UserError):
    """No snapshot was taken."""


def register(app: typer.Typer) -> None:
    app.command(
        epilog="Examples: corevault snapshot 4242 --reason 'stuck since 03:10' · "
        "corevault snapshot --pod shop/checkout-7d9f -c app · corevault snapshot --pod shop/api-0 --kill"
    )(snapshot)


def snapshot(
    ctx: typer.Context,
    pid: int | None = typer.Argument(None, help="Host PID of the process."),
    pod: str | None = typer.Option(None, "--pod", metavar="NS/NAME", help="A pod running on this node."),
    container: str | None = typer.Option(None, "-c", "--container", help="The pod's container."),
    every: bool = typer.Option(False, "--all", help="Every process of the container, not only its first."),
    kill: bool = typer.Option(False, "--kill", help="Kill the process after the core is written."),
    reason: str = typer.Option("", "--reason", help="Why, for the report."),
    requested_by: str | None = typer.Option(None, "--requested-by", help="Who asked \\[default: this user]."),
    timeout: float = typer.Option(
        snap.DEFAULT_TIMEOUT, min=0.001, help="Seconds after which the process is resumed."
    ),
    max_size: str = typer.Option("16G", "--max-size", help="Refuse processes whose core would be larger."),
    as_json: bool = typer.Option(False, "--json", help="Print the outcome as JSON lines."),
) -> None:
    """Write a core of a live process without waiting for it to crash; it is shipped and analysed like one.

    The process is stopped only while its core is written, then goes on (or is killed with
    --kill). The pod's core-pattern annotation decides where the plain core goes.
    """
    if (pid is None) == (pod is None):
        raise BadInput("name a process: a PID or --pod NS/NAME")
    namespace, _, name = (pod or "").partition("/")
    if pod is not None and (not namespace or not name):
        raise BadInput(f"--pod {pod!r}: expected NAMESPACE/NAME")
    if os.geteuid() != 0:
        raise PermissionError(errno.EPERM, "not root", "snapshot")
    settings = config.load(ctx.obj["config"])
    try:
        pids = [pid] if pid is not None else snap.pod_processes(settings, namespace, name, container, every)
        who = requested_by or f"{getpass.getuser()}@{socket.gethostname()}"
        size = config.parse_size(max_size, "--max-size")
        for p in pids:
            out = snap.take(
                settings, p, reason=reason, requested_by=who, kill=kill, timeout=timeout, max_size=size
            )
            _print(out, as_json)
    except snap.SnapshotError as e:
        raise SnapshotFailed(str(e)) from None


def _print(out: snap.Outcome, as_json: bool) -> None:
    if as_json:
        print(json.dumps(dataclasses.asdict(out), sort_keys=True))
        return
    stopped = f"stopped {out.stopped_seconds:.2f}s" if out.stopped_seconds is not None else "stopped"
    print(
        f"process {out.pid}: {out.size} bytes, {stopped}" + (", then killed" if out.killed else ", resumed")
    )
    if out.volume:
        # the path holds what the pattern expanded in it: the process's name (%e), its executable (%E)
        print(f"  core in the pod: {printable(out.volume)}")
    if out.entry:
        print(
            f"  spool entry: {out.entry} (report: corevault analyze {out.entry}; in the vault once shipped)"
        )
