"""``corevault webhook``: the admission webhook that validates core patterns and adds volumes."""

from __future__ import annotations

import sys
from contextlib import suppress

import typer

from corevault.errors import UserError


def register(app: typer.Typer) -> None:
    app.command(epilog="Example: corevault webhook --cert /tls/tls.crt --key /tls/tls.key")(webhook)


def webhook(
    host: str = typer.Option("0.0.0.0", help="Address to listen on."),  # noqa: S104 - a cluster service
    port: int = typer.Option(8443, help="Port to listen on."),
    cert: str = typer.Option(
        "/tls/tls.crt", help="PEM certificate (chain) for TLS (written there with --manage-tls)."
    ),
    key: str = typer.Option(
        "/tls/tls.key", help="PEM private key for TLS (written there with --manage-tls)."
    ),
    manage_tls: bool = typer.Option(
        False, "--manage-tls", help="Keep a CA and certificate in a Secret, rotate them, set caBundle."
    ),
    namespace: str = typer.Option(
        "corevault", envvar="POD_NAMESPACE", help="Namespace of the Secret and Service."
    ),
    secret: str = typer.Option("corevault-webhook-tls", help="Secret that holds the CA and certificate."),
    service: str = typer.Option("corevault-webhook", help="Service the API server calls."),
    configuration: str = typer.Option("corevault", help="MutatingWebhookConfiguration to put the CA into."),
) -> None:
    """Serve the admission webhook over HTTPS until stopped."""
    import os
    import threading

    from corevault import atomic
    from corevault.kube.webhook import serve

    def refresh() -> None:
        from kubernetes import client

        from corevault.kube import certs, cluster

        bundle = certs.ensure(
            cluster.core_api(), client.AdmissionregistrationV1Api(), namespace, secret, service, configuration
        )
        for path, data, mode in ((cert, bundle.cert, 0o644), (key, bundle.key, 0o600)):
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            atomic.write(path, data, mode)

    if manage_tls:
        refresh()
    try:
        server = serve(host, port, cert, key)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot serve on {host}:{port} with {cert}: {e}") from None
    print(f"admission webhook on https://{host}:{port}/", file=sys.stderr)
    if manage_tls:

        def rotate() -> None:
            while True:
                threading.Event().wait(12 * 3600)
                try:
                    refresh()
                    server.tls.load_cert_chain(cert, key)  # type: ignore[attr-defined]
                except Exception as e:  # keep serving with the certificate in hand
                    print(f"corevault: warning: cannot refresh the TLS certificate: {e}", file=sys.stderr)

        threading.Thread(target=rotate, daemon=True, name="tls-rotation").start()
    with suppress(KeyboardInterrupt):
        server.serve_forever()
