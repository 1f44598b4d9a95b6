"""``corevault webhook``: the admission webhook that validates core patterns and adds volumes."""

from __future__ import annotations

import sys
from contextlib import suppress

import typer


def register(app: typer.Typer) -> None:
    app.command(epilog="Example: corevault webhook --cert /tls/tls.crt --key /tls/tls.key")(webhook)


def webhook(
    host: str = typer.Option("0.0.0.0", help="Address to listen on."),  # noqa: S104 - a cluster service
    port: int = typer.Option(8443, help="Port to listen on."),
    cert: str = typer.Option(..., help="PEM certificate (chain) for TLS."),
    key: str = typer.Option(..., help="PEM private key for TLS."),
) -> None:
    """Serve the admission webhook over HTTPS until stopped."""
    from corevault.kube.webhook import serve

    try:
        server = serve(host, port, cert, key)
    except (OSError, ValueError) as e:
        print(f"corevault: error: cannot serve on {host}:{port} with {cert}: {e}", file=sys.stderr)
        raise typer.Exit(1) from None
    print(f"admission webhook on https://{host}:{port}/", file=sys.stderr)
    with suppress(KeyboardInterrupt):
        server.serve_forever()
