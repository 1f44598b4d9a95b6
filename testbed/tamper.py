"""An HTTP proxy on 127.0.0.1 between a client and a server, which a test can have change
what passes: a request's body or headers after the client signed them, an answer's headers
before the client reads them. It also lists the requests it passed, as they were on the wire.

It sits where a flipped bit or a lying store would, whatever the client library (boto3 and
obstore alike): the client is given its address as the store's endpoint, and it forwards each
request unchanged otherwise (the Host header too, so the signature still names what the client
signed). One request per connection to the server; bodies are read whole (tests send small ones).
It can also stand for a server that is not ready yet: ``refuse`` answers a request with an
error of its own, or drops its connection without an answer, instead of passing it on.
"""

from __future__ import annotations

import http.client
import ssl
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Request:
    method: str
    path: str  # with its query
    headers: dict[str, str]
    body: bytes


#: changes a request in place (its ``headers`` and ``body``) before it goes on to the server
RequestChange = Callable[[Request], None]
#: changes an answer's headers in place, given the request it answers
AnswerChange = Callable[[Request, dict[str, str]], None]
#: an HTTP status to answer a request with instead of passing it on, 0 to drop its connection
#: without an answer, or None to pass it on
Refusal = Callable[[Request], int | None]

HOP = {"connection", "keep-alive", "transfer-encoding", "content-length"}


@dataclass
class Tamper:
    target_port: int
    requests: list[Request] = field(default_factory=list)
    change_request: RequestChange | None = None
    change_answer: AnswerChange | None = None
    refuse: Refusal | None = None
    #: the client's address of each connection opened to it (a request or more each)
    connections: list[tuple[str, int]] = field(default_factory=list)
    port: int = 0
    tls: bool = False

    @property
    def endpoint(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def forward(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        request = Request(
            handler.command, handler.path, dict(handler.headers.items()), handler.rfile.read(length)
        )
        if handler.headers.get("Transfer-Encoding"):
            raise ValueError("chunked requests are not passed on")
        self.requests.append(request)
        refusal = self.refuse(request) if self.refuse is not None else None
        if refusal is not None:
            self._refuse(handler, refusal)
            return
        if self.change_request is not None:
            self.change_request(request)
        upstream = http.client.HTTPConnection("127.0.0.1", self.target_port, timeout=60)
        try:
            upstream.putrequest(request.method, request.path, skip_host=True, skip_accept_encoding=True)
            for name, value in request.headers.items():
                if name.lower() != "content-length":
                    upstream.putheader(name, value)
            upstream.putheader("Content-Length", str(len(request.body)))
            upstream.endheaders(request.body)
            answer = upstream.getresponse()
            body = answer.read()
            # a HEAD's Content-Length is the object's, which a test may change; any other is the body's
            headers = {k: v for k, v in answer.getheaders() if k.lower() not in HOP}
            if request.method == "HEAD" and answer.getheader("Content-Length") is not None:
                headers["Content-Length"] = answer.getheader("Content-Length", "")
        finally:
            upstream.close()
        if self.change_answer is not None:
            self.change_answer(request, headers)
        if request.method != "HEAD":
            headers = {k: v for k, v in headers.items() if k.lower() != "content-length"}
            headers["Content-Length"] = str(len(body))
        handler.send_response(answer.status, answer.reason)
        for name, value in headers.items():
            handler.send_header(name, value)
        handler.end_headers()
        if request.method != "HEAD":
            handler.wfile.write(body)

    @staticmethod
    def _refuse(handler: BaseHTTPRequestHandler, status: int) -> None:
        handler.close_connection = True
        if status == 0:
            return  # closed without an answer, as a server not listening yet behind its port
        body = b"<Error><Code>ServiceUnavailable</Code><Message>not ready</Message></Error>"
        handler.send_response(status)
        handler.send_header("Content-Type", "application/xml")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)


def _handler(tamper: Tamper) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self) -> None:
            tamper.connections.append(self.client_address)  # one handler per connection
            super().setup()

        def handle_one_request(self) -> None:
            self.raw_requestline = self.rfile.readline(65537)
            if not self.raw_requestline or not self.parse_request():
                self.close_connection = True
                return
            tamper.forward(self)
            self.wfile.flush()

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Handler


@contextmanager
def tamper(target_port: int, tls: tuple[str, str] | None = None) -> Iterator[Tamper]:
    """A proxy to the server on ``target_port``, stopped on the way out; with ``tls`` (the
    certificate and key files), clients reach it over HTTPS."""
    t = Tamper(target_port, tls=tls is not None)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(t))
    server.daemon_threads = True
    if tls is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*tls)
        server.socket = context.wrap_socket(server.socket, server_side=True)
    t.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield t
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
