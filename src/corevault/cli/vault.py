"""``corevault agent`` and ``corevault vacuum``: the node agent and retention by hand."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys

import typer

from corevault import config, printable


def register(app: typer.Typer) -> None:
    app.command(epilog="Example: corevault agent --once")(agent)
    app.command(epilog="Example: corevault vacuum --dry-run")(vacuum)


def agent(
    ctx: typer.Context,
    once: bool = typer.Option(False, "--once", help="Ship what the spool holds now, then exit."),
    kubernetes: bool = typer.Option(
        False, "--kubernetes", help="Keep the pod index from the API server and post Events (in a cluster)."
    ),
    node: str = typer.Option(
        None, envvar="NODE_NAME", help="This node's name in the cluster [default: node_name]."
    ),
    install: str = typer.Option(
        None,
        "--install",
        metavar="MODE",
        help="Capture on this host while the agent runs, restoring the host's settings on exit: socket (the "
        "kernel streams cores to the agent, Linux 6.16+), pipe (the kernel runs --forwarder), or auto.",
    ),
    forwarder: str = typer.Option(
        None,
        "--forwarder",
        metavar="BINARY",
        help="The static corevault-forward to install as the pipe handler in pipe mode.",
    ),
    handler: str = typer.Option(
        None,
        help="In socket mode set by 'corevault install': the pipe handler that captures while the agent is "
        "stopped \\[default: corevault-capture next to corevault].",
    ),
) -> None:
    """Ship the node spool into the vault, analyse each crash, keep retention, serve metrics.

    Running (not --once) on a kernel with the coredump socket, it also listens there, so that
    'corevault install --mode socket' can send the kernel's cores to it.
    """
    import threading

    from corevault import hostsetup
    from corevault.agent.loop import Agent
    from corevault.errors import UserError

    mode = None
    if install is not None:
        if install not in hostsetup.MODES:
            raise UserError(f"--install {install!r}: use socket, pipe or auto")
        socket_ok = hostsetup.kernel_socket_mode() is not None
        mode = "socket" if install == "socket" or (install == "auto" and socket_ok) else "pipe"
        if mode == "socket" and not socket_ok:
            raise UserError(
                f"this kernel ({os.uname().release}) has no coredump socket (6.16+); use --install pipe"
            )
        if mode == "pipe" and not forwarder:
            raise UserError("pipe mode needs --forwarder BINARY (the static corevault-forward)")

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    for h in logging.getLogger().handlers:  # a crashed process's names are data, never escapes
        h.setFormatter(printable.Formatter("%(asctime)s %(levelname)s %(message)s"))
    settings = config.load(ctx.obj["config"])
    if node:  # in a pod the hostname is the pod's name: the crashes it captures are the node's
        settings.node_name = node
    on_record = None
    if kubernetes:
        from corevault.kube import cluster
        from corevault.kube.events import EventPoster
        from corevault.kube.podwatch import PodWatch

        core = cluster.core_api()
        name = settings.node_name
        watch = PodWatch(core, name, settings.podindex_dir)
        watch.relist()  # the index is current before the first entry is shipped
        threading.Thread(target=watch.run, daemon=True, name="pod-watch").start()
        on_record = EventPoster(core, name)
    a = Agent(settings, on_record=on_record)
    if not once:  # snapshots asked for through the server, of this node's pods
        from corevault.agent.snapshots import SnapshotRequests

        requests = SnapshotRequests(settings, node or settings.node_name, a.stop)
        threading.Thread(target=requests.run, daemon=True, name="snapshots").start()
    for sig in (signal.SIGTERM, signal.SIGINT):  # from here on a stop request still restores the host
        signal.signal(sig, lambda *_: a.stop.set())
    from corevault.agent import health

    if mode is not None:  # not ready until the kernel's (or the forwarder's) way in listens
        a.capture_socket = (
            hostsetup.socket_path(settings.state_dir)
            if mode == "socket"
            else hostsetup.forwarder_paths(settings.state_dir)[1]
        )
    a.metrics.serve(settings.agent_metrics, lambda: health.check(a))
    receiver = listener = None
    from corevault.agent import coredumps
    from corevault.agent import receiver as forwarding

    try:
        # last: the pod index is current when the first crash comes in
        if mode == "pipe":
            receiver = forwarding.install_forwarder(settings, ctx.obj["config"], forwarder)
        elif mode == "socket":
            listener = coredumps.install(settings, ctx.obj["config"])
        elif not once and hostsetup.kernel_socket_mode() is not None:
            listener = coredumps.attend(settings, ctx.obj["config"])  # for 'corevault install --mode socket'
        waiting = a.run(once=once)
    finally:
        if receiver is not None:
            forwarding.give_back(receiver)
        if listener is not None and mode == "socket":
            forwarding.give_back(listener)
        elif listener is not None:
            coredumps.step_aside(listener, ctx.obj["config"], handler or hostsetup.default_handler())
    if once and waiting:
        why = f"the vault is unreachable ({a.unreachable})" if a.unreachable else "shipping failed, see above"
        print(f"corevault: error: {waiting} entries left in the spool: {why}", file=sys.stderr)
        raise typer.Exit(1)


def vacuum(
    ctx: typer.Context,
    dry_run: bool = typer.Option(False, "--dry-run", help="Say what would be removed; remove nothing."),
) -> None:
    """Apply the retention rules of [retention] to the vault now."""
    from corevault.vault import retention, ship

    settings = config.load(ctx.obj["config"])
    gone = retention.vacuum(ship.open_vault(settings), settings, dry_run=dry_run)
    print(json.dumps({"dry_run": dry_run, **gone}, indent=2))
