"""``corevault agent`` and ``corevault vacuum``: the node agent and retention by hand."""

from __future__ import annotations

import json

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
    from corevault.agent import run

    settings = config.load(ctx.obj["config"])
    run.run(
        settings,
        ctx.obj["config"],
        once=once,
        kubernetes=kubernetes,
        node=node,
        install=install,
        forwarder=forwarder,
        handler=handler,
    )


def vacuum(
    ctx: typer.Context,
    dry_run: bool = typer.Option(False, "--dry-run", help="Say what would be removed; remove nothing."),
) -> None:
    """Apply the retention rules of [retention] to the vault now."""
    from corevault.vault import retention
    from corevault.vault.crashes import LocalVault

    settings = config.load(ctx.obj["config"])
    gone = retention.vacuum(LocalVault(settings), settings, dry_run=dry_run)
    print(json.dumps({"dry_run": dry_run, **gone}, indent=2))
