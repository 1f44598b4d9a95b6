"""Entry point of ``corevault``: the Typer app and the one place errors become exit codes.

Exit codes: 0 success, 1 the operation failed (a check found problems, a store could not
be reached), 2 bad usage or input (a user error with a one-line message), 3 an
environment problem (not root), 4 no such crash.
"""

from __future__ import annotations

import sys

import typer

from corevault import config, pattern
from corevault.cli import analyze, crashes, groups, host, patterns, serve, snapshot, vault, webhook
from corevault.errors import UserError
from corevault.printable import printable

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_ENVIRONMENT = 3
EXIT_NOT_FOUND = 4

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
    """Run the app; the errors a user can cause become one line and an exit code here."""
    try:
        app(args=argv, prog_name="corevault")  # usage errors: click prints them, exits 2
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else EXIT_FAILED
    except (config.ConfigError, pattern.PatternError) as e:
        return _error(str(e), EXIT_USAGE)
    except UserError as e:
        from corevault.vault.crashes import NotFound

        return _error(str(e), EXIT_NOT_FOUND if isinstance(e, NotFound) else EXIT_FAILED)
    except PermissionError as e:
        return _error(f"{e.filename or 'operation'}: permission denied; run as root", EXIT_ENVIRONMENT)
    return 0


def _error(message: str, code: int) -> int:
    # An error can quote what a crashed process named (a path, a symbol, a debugger's output): data only.
    print(f"corevault: error: {printable(message)}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
