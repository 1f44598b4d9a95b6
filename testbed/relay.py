"""A TCP relay on 127.0.0.1 that counts the bytes clients send through it to a server.

Put between an agent and its store, it measures what the agent really sent (bodies and
headers, retries included), also for an agent that is SIGKILLed midway: what a killed
process had in flight is counted as far as it got onto the wire. With ``pace``, it passes on
at most that many bytes a second towards the server, over all connections: an upload then
lasts long enough for a test to stop its agent midway however busy the machine is. With
``tls`` (a certificate and key), clients reach it over TLS: an HTTP proxy behind it becomes an
``https://`` one (for small exchanges: each TLS connection is read and written by two threads).
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress


class Relay:
    def __init__(self, target_port: int, pace: int | None = None, tls: tuple[str, str] | None = None) -> None:
        self.target_port = target_port
        self.pace = pace
        #: with a certificate and key, clients reach the relay over TLS (the server behind it without)
        self.tls: ssl.SSLContext | None = None
        if tls is not None:
            self.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.tls.load_cert_chain(*tls)
        self._free_at = 0.0  # when the paced wire is free for the next chunk
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        #: bytes clients sent towards the server so far
        self.sent = 0
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []

    @property
    def endpoint(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def serve(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            if self.tls is None:
                self._connect(client)
            else:  # the handshake on a thread of its own: a slow client holds up no other
                threading.Thread(target=self._connect, args=(client,), daemon=True).start()

    def _connect(self, client: socket.socket) -> None:
        try:
            if self.tls is not None:
                client = self.tls.wrap_socket(client, server_side=True)
            server = socket.create_connection(("127.0.0.1", self.target_port))
        except OSError:
            client.close()  # the server is down: so is the relay, for this connection
            return
        with self._lock:
            self._sockets += [client, server]
        for src, dst, counted in ((client, server, True), (server, client, False)):
            t = threading.Thread(target=self._pump, args=(src, dst, counted), daemon=True)
            t.start()
            self._threads.append(t)

    def _pump(self, src: socket.socket, dst: socket.socket, counted: bool) -> None:
        try:
            while data := src.recv(1 << 16):
                if counted:
                    wait = 0.0
                    with self._lock:
                        self.sent += len(data)
                        if self.pace:
                            self._free_at = max(self._free_at, time.monotonic()) + len(data) / self.pace
                            wait = self._free_at - time.monotonic()
                    if wait > 0:
                        time.sleep(wait)
                dst.sendall(data)
        except OSError:
            pass
        with suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def settle(self, quiet: float = 0.5) -> int:
        """The count once nothing has come through for ``quiet`` seconds (a killed client's last bytes)."""
        last = -1
        while last != self.sent:
            last = self.sent
            time.sleep(quiet)
        return last

    def close(self) -> None:
        """Stop relaying: new connections are refused, open ones cut."""
        with suppress(OSError):  # wakes the accepting thread; a close alone leaves it listening
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        with self._lock:
            for s in self._sockets:
                with suppress(OSError):
                    s.close()


@contextmanager
def relay(target_port: int, pace: int | None = None, tls: tuple[str, str] | None = None) -> Iterator[Relay]:
    r = Relay(target_port, pace, tls)
    acceptor = threading.Thread(target=r.serve, daemon=True)
    acceptor.start()
    try:
        yield r
    finally:
        r.close()
        acceptor.join(5)
