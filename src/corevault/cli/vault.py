"""``corevault agent`` and ``corevault vacuum``: the node agent and retention by hand."""

from __future__ import annotations

import json
import logging
import sys

import typer

from corevault import config


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
    install_forwarder: str = typer.Option(
        None,
        "--install-forwarder",
        metavar="BINARY",
        help="Install this static corevault-forward as the host's pipe handler, capture what it hands over, "
        "and restore the host's settings on exit.",
    ),
) -> None:
    """Ship the node spool into the vault, analyse each crash, keep retention, serve metrics."""
    import threading

    from corevault.agent.loop import Agent

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    settings = config.load(ctx.obj["config"])
    on_record = None
    if kubernetes:
        from corevault.kube import cluster
        from corevault.kube.events import EventPoster
        from corevault.kube.podwatch import PodWatch

        core = cluster.core_api()
        name = node or settings.node_name
        watch = PodWatch(core, name, settings.podindex_dir)
        watch.relist()  # the index is current before the first entry is shipped
        threading.Thread(target=watch.run, daemon=True, name="pod-watch").start()
        on_record = EventPoster(core, name)
    a = Agent(settings, on_record=on_record)
    a.metrics.serve(settings.agent_metrics)
    receiver = None
    try:
        if install_forwarder:  # last: the pod index is current when the first crash comes in
            from corevault.agent import receiver as forwarding

            receiver = forwarding.install_forwarder(settings, ctx.obj["config"], install_forwarder)
        waiting = a.run(once=once)
    finally:
        if receiver is not None:
            forwarding.uninstall_forwarder(receiver)
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
