"""``corevault install | uninstall | status``: the handler on this host's kernel."""

from __future__ import annotations

import json

import typer

from corevault import config, hostsetup, printable, spool
from corevault.cli import exits


def _settings(ctx: typer.Context) -> config.Settings:
    return config.load(ctx.obj["config"])


def register(app: typer.Typer) -> None:
    app.command(epilog="Examples: corevault install · corevault install --mode pipe --pipe-limit 16")(install)
    app.command(epilog="Example: corevault uninstall")(uninstall)
    app.command(epilog="Example: corevault status --json")(status)


def install(
    ctx: typer.Context,
    handler: str = typer.Option(
        None, help="Handler executable \\[default: corevault-capture next to corevault]."
    ),
    pipe_limit: int = typer.Option(16, help="kernel.core_pipe_limit: crashes handled at once."),
    suid_dumpable: int = typer.Option(
        2, help="fs.suid_dumpable: 2 keeps cores of processes that dropped privileges."
    ),
    force: bool = typer.Option(False, "--force", help="Replace another tool's pipe handler."),
    mode: str = typer.Option(
        "auto",
        help="socket: the kernel streams cores to the running agent, which can refuse them before they are "
        "written (Linux 6.17+; 6.16 streams without asking); pipe: a handler process per crash; auto: socket when the kernel has it and "
        "an agent listens, else pipe.",
    ),
) -> None:
    """Point the kernel's core_pattern at corevault, saving the host's settings."""
    settings = _settings(ctx)
    chosen = hostsetup.choose_mode(mode, settings.state_dir)
    state = hostsetup.install(
        None if chosen == "socket" else handler or hostsetup.default_handler(),
        config_path=ctx.obj["config"],
        pipe_limit=pipe_limit,
        suid_dumpable=suid_dumpable,
        force=force,
        socket=hostsetup.socket_path(settings.state_dir) if chosen == "socket" else None,
        requests=hostsetup.kernel_socket_mode() == "@@",
    )
    print(f"installed ({chosen} mode): core_pattern = {state['installed']['core_pattern']}")
    print(f"handler settings: {state['snapshot']} (run install again after changing the settings file)")
    print("saved the host's own core settings; 'corevault uninstall' restores them")


def uninstall(ctx: typer.Context) -> None:
    """Restore the core_pattern, core_pipe_limit and suid_dumpable saved by install."""
    state = hostsetup.uninstall(hostsetup.state_path(_settings(ctx)))
    if state is None:
        print("corevault is not installed here; nothing to restore")
        return
    saved = state["saved"]
    print(
        f"restored: core_pattern = {saved['core_pattern']}, core_pipe_limit = {saved['core_pipe_limit']}, "
        f"suid_dumpable = {saved['suid_dumpable']}"
    )


def status(ctx: typer.Context, as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Say what is installed, what was saved, whether crashes on this host are lost, and which
    spool entries the agent set aside (quarantine/, with why)."""
    settings = _settings(ctx)
    st = hostsetup.status(hostsetup.state_path(settings))
    st["spool"] = settings.spool_dir
    st["quarantined"] = [{"id": i, "reason": why} for i, why in spool.quarantined(settings.spool_dir)]
    if as_json:
        print(json.dumps(st, indent=2))
    else:
        # imported here, as the other commands do: the agent's start has no use for rich
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text

        table = Table(show_header=False, box=None)
        table.add_row("installed", f"yes ({st['mode']} mode)" if st["installed"] else "no")
        for key, value in st["current"].items():
            saved = st["saved"][key] if st["saved"] else None
            table.add_row(
                key, value + (f"   [dim](saved: {saved})[/dim]" if saved not in (None, value) else "")
            )
        table.add_row("spool", st["spool"])
        if st["quarantined"]:
            where = spool.quarantine_dir(settings.spool_dir)
            table.add_row("quarantined", Text(f"{len(st['quarantined'])} entries set aside in {where}"))
        for q in st["quarantined"]:  # the reason quotes a crash's values: data, never markup
            table.add_row("", Text(f"{q['id']}: {printable.printable(q['reason'])}"))
        Console().print(table)
        for problem in st["problems"]:
            Console(stderr=True, soft_wrap=True).print(f"[red]problem:[/red] {problem}")
    if st["problems"]:
        raise typer.Exit(exits.EXIT_FAILED)
