"""A local token endpoint on 127.0.0.1 for the clouds' workload identity flows.

Each cloud's SDK turns a projected ServiceAccount token (a file in the pod) into short-lived
credentials by sending the file's content to its security token service. This endpoint stands
in for those services where an SDK lets the service's URL be pointed elsewhere:

- AWS STS ``AssumeRoleWithWebIdentity`` (a form POST, XML answer): hands out the given access
  key (SeaweedFS's) with an empty session token and an expiry ``lifetime`` seconds away.
- Google's STS token exchange (RFC 8693, ``grant_type=...:token-exchange``, JSON answer): an
  opaque access token that lives ``lifetime`` seconds (fake-gcs-server takes any bearer token).

- Microsoft Entra's token endpoint (``/TENANT/oauth2/v2.0/token``, a client-credentials grant
  with the federated token as ``client_assertion``, JSON answer): an unsigned JWT for Azure
  Storage that Azurite with OAuth takes, living ``lifetime`` seconds. azure-identity asks only an
  ``https`` authority: give ``tls`` (a certificate and key for 127.0.0.1) and trust it.

Every subject token it was given is recorded, in order, with its flow, so that a test can show
that the file's content reached the service, and that a rewritten file was read again.
A subject token listed in ``refused`` gets the service's refusal instead of credentials.
"""

from __future__ import annotations

import base64
import json
import secrets
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs
from xml.sax.saxutils import escape

TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"  # noqa: S105 - a grant type


@dataclass
class TokenEndpoint:
    url: str
    access_key: str
    secret_key: str
    lifetime: int
    #: (flow, subject token) in the order they arrived; flow is "aws", "gcp" or "azure"
    received: list[tuple[str, str]] = field(default_factory=list)
    refused: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def subjects(self, flow: str) -> list[str]:
        with self.lock:
            return [token for kind, token in self.received if kind == flow]

    def _record(self, flow: str, token: str) -> bool:
        with self.lock:
            self.received.append((flow, token))
            return token not in self.refused

    def aws(self, form: dict[str, str]) -> tuple[int, str, bytes]:
        token = form.get("WebIdentityToken", "")
        if form.get("Action") != "AssumeRoleWithWebIdentity" or not form.get("RoleArn"):
            return 400, "text/xml", _aws_error("InvalidAction", "only AssumeRoleWithWebIdentity is served")
        if not self._record("aws", token):
            return 400, "text/xml", _aws_error("InvalidIdentityToken", "the web identity token is refused")
        expires = (datetime.now(UTC) + timedelta(seconds=self.lifetime)).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = (
            '<AssumeRoleWithWebIdentityResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">'
            "<AssumeRoleWithWebIdentityResult><Credentials>"
            f"<AccessKeyId>{escape(self.access_key)}</AccessKeyId>"
            f"<SecretAccessKey>{escape(self.secret_key)}</SecretAccessKey>"
            # empty: SeaweedFS takes a session token as its own STS's and refuses the key with one
            "<SessionToken></SessionToken>"
            f"<Expiration>{expires}</Expiration></Credentials>"
            "<SubjectFromWebIdentityToken>system:serviceaccount:corevault:agent</SubjectFromWebIdentityToken>"
            f"<AssumedRoleUser><Arn>{escape(form['RoleArn'])}/corevault</Arn>"
            "<AssumedRoleId>AROATEST:corevault</AssumedRoleId></AssumedRoleUser>"
            "</AssumeRoleWithWebIdentityResult>"
            f"<ResponseMetadata><RequestId>{secrets.token_hex(8)}</RequestId></ResponseMetadata>"
            "</AssumeRoleWithWebIdentityResponse>"
        )
        return 200, "text/xml", body.encode()

    def gcp(self, form: dict[str, str]) -> tuple[int, str, bytes]:
        if form.get("grant_type") != TOKEN_EXCHANGE:
            return 400, "application/json", json.dumps({"error": "unsupported_grant_type"}).encode()
        if not self._record("gcp", form.get("subject_token", "")):
            return 400, "application/json", json.dumps({"error": "invalid_grant"}).encode()
        answer = {
            "access_token": "ya29.test-" + secrets.token_hex(16),
            "issued_token_type": "urn:ietf:params:oauth:token-type:access_token",
            "token_type": "Bearer",
            "expires_in": self.lifetime,
        }
        return 200, "application/json", json.dumps(answer).encode()

    def azure(self, tenant: str, form: dict[str, str]) -> tuple[int, str, bytes]:
        if form.get("grant_type") != "client_credentials" or not form.get("client_id"):
            return 400, "application/json", json.dumps({"error": "unsupported_grant_type"}).encode()
        if not self._record("azure", form.get("client_assertion", "")):
            answer = {"error": "invalid_client", "error_description": "AADSTS700213: assertion refused"}
            return 401, "application/json", json.dumps(answer).encode()
        now = int(time.time())
        claims = {
            "aud": "https://storage.azure.com", "iss": f"https://sts.windows.net/{tenant}/",
            "iat": now, "nbf": now - 60, "exp": now + self.lifetime, "tid": tenant,
            "appid": form["client_id"], "oid": form["client_id"],
        }  # fmt: skip
        jwt = ".".join(_b64(json.dumps(part).encode()) for part in ({"alg": "none", "typ": "JWT"}, claims))
        answer = {"token_type": "Bearer", "expires_in": self.lifetime, "ext_expires_in": self.lifetime}
        return 200, "application/json", json.dumps(answer | {"access_token": jwt + "."}).encode()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _aws_error(code: str, message: str) -> bytes:
    return (
        '<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><Error><Type>Sender</Type>'
        f"<Code>{code}</Code><Message>{escape(message)}</Message></Error>"
        "<RequestId>0</RequestId></ErrorResponse>"
    ).encode()


@contextmanager
def token_endpoint(
    access_key: str = "", secret_key: str = "", lifetime: int = 3600, tls: tuple[str, str] | None = None
) -> Iterator[TokenEndpoint]:
    """The endpoint on a free port of 127.0.0.1, served by a thread of this process until the block ends."""
    endpoint: TokenEndpoint

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = min(int(self.headers.get("Content-Length") or 0), 1 << 20)
            form = {k: v[0] for k, v in parse_qs(self.rfile.read(length).decode()).items()}
            path = self.path.split("?")[0].rstrip("/")
            if path.endswith("/oauth2/v2.0/token"):
                status, kind, body = endpoint.azure(path.split("/")[1], form)
            elif path.endswith("/token"):
                status, kind, body = endpoint.gcp(form)
            else:
                status, kind, body = endpoint.aws(form)
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    if tls is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*tls)
        server.socket = context.wrap_socket(server.socket, server_side=True)
    url = f"{'https' if tls else 'http'}://127.0.0.1:{server.server_address[1]}"
    endpoint = TokenEndpoint(url, access_key, secret_key, lifetime)
    thread = threading.Thread(target=server.serve_forever, name="token-endpoint", daemon=True)
    thread.start()
    try:
        yield endpoint
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
