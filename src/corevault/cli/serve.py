"""``corevault serve``: the web UI, the JSON API and the debuginfod server over the vault."""

from __future__ import annotations

import os
import socket
import sys

import typer

from corevault import config
from corevault.errors import BadInput, UserError


def register(app: typer.Typer) -> None:
    app.command(
        epilog="Examples: corevault serve --no-auth (127.0.0.1:8080 only) · "
        "corevault serve --listen 0.0.0.0:8080 --tokens /etc/corevault/tokens.toml · "
        "corevault serve --listen 0.0.0.0:8080 --kubernetes"
    )(serve)


def parse_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise BadInput(f"--listen {listen!r}: use HOST:PORT, e.g. 127.0.0.1:8080")
    return host.strip("[]") or "127.0.0.1", int(port)


def _check_listen(host: str, port: int) -> None:
    """Fail in one line, before saying "serving", where uvicorn would log a bind error and exit 3."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.create_server((host, port), family=family):  # SO_REUSEADDR, as uvicorn binds
            pass
    except OSError as e:
        raise UserError(
            f"cannot listen on {host}:{port}: {os.strerror(e.errno) if e.errno else e}; pick another --listen"
        ) from None


def serve(
    ctx: typer.Context,
    listen: str = typer.Option("127.0.0.1:8080", envvar="COREVAULT_LISTEN", help="HOST:PORT to listen on."),
    no_auth: bool = typer.Option(False, "--no-auth", help="Let everyone read everything (127.0.0.1 only)."),
    tokens: str = typer.Option(
        None, "--tokens", metavar="FILE", help="Bearer tokens and their namespaces (TOML)."
    ),
    kubernetes: bool = typer.Option(
        False, "--kubernetes", help="Check callers' Kubernetes tokens (TokenReview, SubjectAccessReview)."
    ),
    kubeconfig: str = typer.Option(None, help="kubeconfig for --kubernetes outside a cluster."),
    tls_cert: str = typer.Option(None, help="PEM certificate to serve HTTPS with."),
    tls_key: str = typer.Option(None, help="PEM private key of --tls-cert."),
    access_log: bool = typer.Option(False, "--access-log", help="Log every request."),
) -> None:
    """Serve the web UI, the HTTP API and debuginfod over the vault until stopped."""
    from corevault.server import access as acc

    host, port = parse_listen(listen)
    if sum((no_auth, tokens is not None, kubernetes)) != 1:
        raise BadInput(
            "say how readers are checked, with one of: --tokens FILE, --kubernetes, or --no-auth (127.0.0.1 only)"
        )
    if (tls_cert is None) != (tls_key is None):
        raise BadInput("--tls-cert and --tls-key go together")
    if no_auth:
        acc.check_open(host)
        access: acc.Access = acc.Open()
    elif tokens is not None:
        access = acc.StaticTokens(tokens)
    else:
        from corevault.kube import cluster

        access = acc.KubeAccess(cluster.api_client(kubeconfig))
    _check_listen(host, port)
    import uvicorn

    from corevault.alerts import sinks
    from corevault.server import zerocopy
    from corevault.server.app import create_app

    zerocopy.install()

    settings = config.load(ctx.obj["config"])
    alerting = sinks.parse(settings.alerts)
    app = create_app(settings, access)
    problem = app.state.server.redirects.problem()
    if problem is not None:
        raise UserError(problem)
    scheme = "https" if tls_cert else "http"
    shown = f"[{host}]" if ":" in host else host
    print(f"corevault: serving {scheme}://{shown}:{port}/ (Ctrl-C stops)", file=sys.stderr, flush=True)
    if alerting is not None:
        from corevault.alerts.outbox import Dispatcher

        # the server stops it as it shuts down, before it closes the catalog the alerts read
        app.state.server.dispatcher = Dispatcher(app.state.server.vault.engine, alerting).start()
        names = ", ".join(s.name for s in alerting.sinks)
        print(f"corevault: sending alerts to {names}", file=sys.stderr, flush=True)
    try:
        uvicorn.run(
            app, host=host, port=port, log_level="warning", access_log=access_log,
            ssl_certfile=tls_cert, ssl_keyfile=tls_key, server_header=False,
        )  # fmt: skip
    finally:
        app.state.server.close()  # also when uvicorn failed before its shutdown closed it
