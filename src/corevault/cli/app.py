"""Entry point of ``corevault``: the Typer app; :mod:`corevault.cli.exits` turns errors into exit codes."""

from __future__ import annotations

import sys

import typer

from corevault.cli import analyze, crashes, exits, groups, host, patterns, serve, snapshot, vault, webhook

app = typer.Typer(
    name="corevault",
    help="Capture, keep and explain core dumps of crashing processes in pods and on hosts.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def _root(
    ctx: typer.Context,
    config_file: str | None = typer.Option(
        None,
        "--config",
        "-c",
        envvar="COREVAULT_CONFIG",
        help="Settings file \\[default: /etc/corevault/config.toml].",
    ),
    server: str | None = typer.Option(
        None,
        "--server",
        envvar="COREVAULT_SERVER",
        help="Work against this corevault server's API (http(s)://HOST:PORT) instead of the local vault.",
    ),
    token_file: str | None = typer.Option(
        None, "--token-file", help="File holding the server's bearer token \\[default: $COREVAULT_TOKEN]."
    ),
) -> None:
    ctx.obj = {"config": config_file, "server": server, "token_file": token_file}


host.register(app)
patterns.register(app)
crashes.register(app)
groups.register(app)
analyze.register(app)
snapshot.register(app)
vault.register(app)
webhook.register(app)
serve.register(app)


def main(argv: list[str] | None = None) -> int:
    return exits.run(app, argv, "corevault")


if __name__ == "__main__":
    sys.exit(main())
