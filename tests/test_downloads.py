"""Binaries downloaded at disk speed: sent by the kernel from a file store, fetched from S3 itself.

A vault holds one crash of namespace ``a`` that mapped a 5 MiB binary. From a file store the
debuginfod endpoint answers through ``sendfile(2)`` (counted here: the server runs in this
process), whole or a range, byte for byte the stored file. From S3 (a real SeaweedFS) a
reader who may see the crash is redirected to a presigned URL that curl -L and corevault's
own client follow without the reader's token; a reader of another namespace gets the same
404 as for a build-id nobody has; HEAD still answers with the size itself.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from corevault import config
from corevault.server.access import AccessError, Denied, StaticTokens
from corevault.server.app import create_app
from corevault.vault import blobs, catalog, stores
from corevault.vault.remote import RemoteVault
from testbed import relay, servers
from tests.conftest import starts_servers

BUILD_ID = "5e" * 20
TOKENS = {"a": "a-reader-token-0123456789", "b": "b-reader-token-0123456789"}


def vault(settings: config.Settings, tmp_path: Path, size: int = 5 << 20) -> tuple[bytes, str]:
    """One crash of namespace ``a`` and the binary it mapped; returns the binary and its sha256."""
    binary = os.urandom(size)
    sha = hashlib.sha256(binary).hexdigest()
    local = tmp_path / "binary"
    local.write_bytes(binary)
    stores.vault_store(settings).put_file(blobs.object_key(BUILD_ID, sha), str(local))
    engine = catalog.connect(settings.catalog_url)
    meta = {"id": "c1", "time": int(time.time()), "pod": {"namespace": "a", "name": "web-1"},
            "modules": [{"path": "/app/web", "key": BUILD_ID, "sha256": sha}]}  # fmt: skip
    with engine.begin() as conn:
        catalog.add_crash(conn, meta, "off")
        catalog.add_object(conn, BUILD_ID, sha, len(binary), debuginfo=False)
    engine.dispose()
    return binary, sha


def tokens(tmp_path: Path) -> str:
    path = tmp_path / "tokens.toml"
    path.write_text("".join(f'[[token]]\nname = "{ns}"\ntoken = "{t}"\nnamespaces = ["{ns}"]\n'
                            for ns, t in TOKENS.items()))  # fmt: skip
    path.chmod(0o600)
    return str(path)


def get(url: str, who: str, **kw: object) -> httpx.Response:
    headers = {"Authorization": f"Bearer {TOKENS[who]}", **kw.pop("headers", {})}  # type: ignore[dict-item]
    return httpx.get(url, headers=headers, timeout=60, **kw)  # type: ignore[arg-type]


#: uvicorn's protocol and loop: what ``corevault serve`` runs, and uvicorn's fallbacks without them
STACKS = [
    pytest.param(("httptools", "uvloop"), id="httptools-uvloop"),
    pytest.param(("h11", "asyncio"), id="h11"),
]


@pytest.mark.parametrize("stack", STACKS)
def test_a_binary_from_a_file_store_is_sent_by_the_kernel(
    tmp_path: Path, sendfile_calls: list[int], stack: tuple[str, str]
) -> None:
    settings = config.from_dict({"state_dir": str(tmp_path / "state")})
    binary, _ = vault(settings, tmp_path)
    with servers.asgi(create_app(settings, StaticTokens(tokens(tmp_path))), *stack) as url:
        whole = get(f"{url}/buildid/{BUILD_ID}/executable", "a")
        assert whole.status_code == 200 and whole.content == binary
        assert sum(sendfile_calls) == len(binary)
        sendfile_calls.clear()
        part = get(f"{url}/buildid/{BUILD_ID}/executable", "a", headers={"Range": "bytes=1000000-3999999"})
        assert part.status_code == 206 and part.content == binary[1_000_000:4_000_000]
        assert sum(sendfile_calls) == 3_000_000
        # and again on the same connection: the response ended where its length said
        with httpx.Client(headers={"Authorization": f"Bearer {TOKENS['a']}"}) as client:
            for _ in range(2):
                assert client.get(f"{url}/buildid/{BUILD_ID}/executable").content == binary
        assert get(f"{url}/buildid/{BUILD_ID}/executable", "b").status_code == 404


@pytest.mark.parametrize("stack", STACKS)
def test_a_binary_over_https_is_encrypted_not_sent_by_the_kernel(
    tmp_path: Path, sendfile_calls: list[int], stack: tuple[str, str]
) -> None:
    """The kernel's send would put the file on the wire in the clear, past TLS: over HTTPS the
    zero-copy send is not offered and the file goes through TLS, whole and as a range."""
    import ssl

    from testbed import tls

    settings = config.from_dict({"state_dir": str(tmp_path / "state")})
    binary, _ = vault(settings, tmp_path)
    (tmp_path / "tls").mkdir()
    cert, key = tls.self_signed(str(tmp_path / "tls"))
    trust = ssl.create_default_context(cafile=cert)
    app = create_app(settings, StaticTokens(tokens(tmp_path)))
    with servers.asgi(app, *stack, tls=(cert, key)) as url:
        assert url.startswith("https://")
        assert get(f"{url}/buildid/{BUILD_ID}/executable", "a", verify=trust).content == binary
        part = get(
            f"{url}/buildid/{BUILD_ID}/executable", "a", verify=trust, headers={"Range": "bytes=10-4000009"}
        )
        assert part.status_code == 206 and part.content == binary[10:4_000_010]
    assert sendfile_calls == []


def leave_mid_download(url: str) -> None:
    """Ask for the binary as reader ``a``, read its headers and the first bytes of its body (so
    the server's send has begun) and reset the connection."""
    request = f"GET /buildid/{BUILD_ID}/executable HTTP/1.1\r\nHost: x\r\n"
    request += f"Authorization: Bearer {TOKENS['a']}\r\n\r\n"
    with socket.socket() as s:
        # a small window (set before connecting): the kernel's send is cut midway
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(("127.0.0.1", int(url.rsplit(":", 1)[1])))
        s.sendall(request.encode())
        got = s.recv(4096)
        assert got.startswith(b"HTTP/1.1 200")
        while len(got.partition(b"\r\n\r\n")[2]) == 0:
            got += s.recv(4096)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # reset


class _FarTokens(StaticTokens):
    """Static tokens standing for a check that may wait on another host (a TokenReview)."""

    local = False


@pytest.mark.parametrize("stack", STACKS)
@pytest.mark.parametrize("access", [StaticTokens, _FarTokens])
def test_a_reader_that_goes_away_mid_download_is_no_server_error(
    tmp_path: Path, access: type[StaticTokens], stack: tuple[str, str]
) -> None:
    """Clients cancel downloads (a debugger that has what it needs, curl | head): the kernel's
    send then fails, and the server lets the response go as it does a streamed one; whether the
    download was looked up on the event loop or in a worker thread."""
    settings = config.from_dict({"state_dir": str(tmp_path / "state")})
    binary, _ = vault(settings, tmp_path, 16 << 20)
    errors: list[logging.LogRecord] = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = errors.append  # type: ignore[method-assign]
    with servers.asgi(create_app(settings, access(tokens(tmp_path))), *stack) as url:
        logging.getLogger("uvicorn.error").addHandler(handler)  # uvicorn set its loggers up by now
        try:
            for _ in range(3):
                leave_mid_download(url)
            assert get(f"{url}/buildid/{BUILD_ID}/executable", "a").content == binary
            deadline = time.monotonic() + 1
            while not errors and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            logging.getLogger("uvicorn.error").removeHandler(handler)
    assert not errors, [e.getMessage() for e in errors]


def served_bytes(url: str) -> float:
    """The server's ``corevault_served_bytes`` of debuginfod downloads (0 before the first)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for sample in family.samples:
            if sample.name == "corevault_served_bytes_total" and sample.labels == {"what": "debuginfod"}:
                return sample.value
    return 0.0


@pytest.mark.parametrize("stack", STACKS)
def test_a_slow_reader_gets_every_byte_and_the_connection_stays_usable(
    tmp_path: Path, sendfile_calls: list[int], stack: tuple[str, str]
) -> None:
    """A reader slower than the kernel's send: the socket's buffers fill, the server waits for
    room (on uvloop, on its own duplicate of the socket) and goes on where it stopped; the next
    request on the same connection is answered after the last byte."""
    settings = config.from_dict({"state_dir": str(tmp_path / "state")})
    binary, _ = vault(settings, tmp_path, 8 << 20)  # more than the socket's buffers hold
    request = f"GET /buildid/{BUILD_ID}/executable HTTP/1.1\r\nHost: x\r\n"
    request += f"Authorization: Bearer {TOKENS['a']}\r\n\r\n"
    with (
        servers.asgi(create_app(settings, StaticTokens(tokens(tmp_path))), *stack) as url,
        socket.socket() as s,
    ):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)  # before connecting: its window
        s.connect(("127.0.0.1", int(url.rsplit(":", 1)[1])))
        for _ in range(2):
            s.sendall(request.encode())
            got = b""
            while b"\r\n\r\n" not in got:
                got += s.recv(4096)
            head, _, body = got.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200") and f"{len(binary)}".encode() in head
            time.sleep(0.3)  # reading nothing meanwhile: the server's send finds the buffers full
            while len(body) < len(binary):
                chunk = s.recv(64 << 10)
                assert chunk, "the server closed the connection mid-body"
                body += chunk
            assert body == binary
    # the kernel sent it all, in many sends: the server waited for room between them
    assert sum(sendfile_calls) == 2 * len(binary) and len(sendfile_calls) > 2


@pytest.mark.parametrize("stack", STACKS)
def test_a_reader_that_leaves_mid_download_is_counted_for_what_it_was_sent(
    tmp_path: Path, stack: tuple[str, str]
) -> None:
    """The byte counter says what went out, not what the response would have held: a reader that
    resets the connection after the headers got at most the socket buffers' worth (4 MiB here)."""
    settings = config.from_dict({"state_dir": str(tmp_path / "state")})
    binary, _ = vault(settings, tmp_path, 32 << 20)
    with servers.asgi(create_app(settings, StaticTokens(tokens(tmp_path))), *stack) as url:
        leave_mid_download(url)
        deadline = time.monotonic() + 20
        while (left := served_bytes(url)) == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert 0 < left < len(binary) // 4
        assert get(f"{url}/buildid/{BUILD_ID}/executable", "a").content == binary
        assert served_bytes(url) == left + len(binary)  # a whole download counts whole


@pytest.fixture
@starts_servers
def s3_vault(tmp_path: Path) -> Iterator[tuple[config.Settings, servers.Seaweed]]:
    with servers.seaweed() as w:
        os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"] = servers.KEY, servers.SECRET
        try:
            yield config.from_dict({
                "state_dir": str(tmp_path / "state"),
                "vault": {"store": f"s3://{w.bucket}/v", "s3": {"endpoint": w.endpoint, "addressing": "path"}},
            }), w  # fmt: skip
        finally:
            del os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"]


def test_a_binary_in_s3_is_fetched_from_s3_after_the_access_check(
    s3_vault: tuple[config.Settings, servers.Seaweed], tmp_path: Path
) -> None:
    settings, w = s3_vault
    binary, sha = vault(settings, tmp_path)
    app = create_app(settings, StaticTokens(tokens(tmp_path)))
    assert not app.state.server.local  # what the store answers is asked in a worker thread
    with servers.asgi(app) as url:
        path = f"{url}/buildid/{BUILD_ID}/executable"
        redirect = get(path, "a")
        location = redirect.headers["location"]
        assert redirect.status_code == 307 and location.startswith(w.endpoint + f"/{w.bucket}/v/buildid/")
        assert "Expires=" in location or "X-Amz-Expires=60" in location
        assert get(path, "b").status_code == 404  # no redirect, no URL, for another tenant
        head = httpx.head(path, headers={"Authorization": f"Bearer {TOKENS['a']}"})
        assert head.status_code == 200 and head.headers["x-debuginfod-size"] == str(len(binary))
        curl = ["curl", "-sf", "-H", f"Authorization: Bearer {TOKENS['a']}", path]
        assert subprocess.run([*curl[:1], "-L", *curl[1:]], capture_output=True, check=True).stdout == binary
        assert subprocess.run(curl, capture_output=True, check=True).stdout == b""  # curl without -L
        fetched = tmp_path / "fetched"
        remote = RemoteVault(url, TOKENS["a"])
        assert remote.binary("c1", {"key": BUILD_ID, "sha256": sha}, str(fetched))
        assert fetched.read_bytes() == binary


def test_redirects_can_be_turned_off_for_stores_readers_cannot_reach(
    s3_vault: tuple[config.Settings, servers.Seaweed], tmp_path: Path
) -> None:
    settings, _ = s3_vault
    settings.s3.redirect_downloads = False
    binary, _ = vault(settings, tmp_path)
    with servers.asgi(create_app(settings, StaticTokens(tokens(tmp_path)))) as url:
        served = get(f"{url}/buildid/{BUILD_ID}/executable", "a")
        assert served.status_code == 200 and served.content == binary


def test_a_core_in_s3_is_fetched_from_s3_as_stored_by_a_client_that_takes_zstd(
    s3_vault: tuple[config.Settings, servers.Seaweed], tmp_path: Path
) -> None:
    """The redirect asks the store to answer with ``Content-Encoding: zstd``: curl --compressed -L
    and corevault's client decompress the stored core; a range or a client that does not take zstd
    is answered by the server with the plain core."""
    import zstandard

    settings, w = s3_vault
    plain = os.urandom(1 << 20) + bytes(3 << 20)
    packed = tmp_path / "core.zst"
    packed.write_bytes(zstandard.ZstdCompressor(write_checksum=True).compress(plain))
    stores.vault_store(settings).put_file(blobs.core_key("c2"), str(packed))
    engine = catalog.connect(settings.catalog_url)
    meta = {"id": "c2", "time": int(time.time()), "pod": {"namespace": "a", "name": "web-1"},
            "core": {"size": len(plain), "stored_size": packed.stat().st_size,
                     "sha256": hashlib.sha256(plain).hexdigest()}}  # fmt: skip
    with engine.begin() as conn:
        catalog.add_crash(conn, meta, "off")
    engine.dispose()
    with servers.asgi(create_app(settings, StaticTokens(tokens(tmp_path)))) as url:
        path = f"{url}/api/v1/crashes/c2/core"
        redirect = get(path, "a", headers={"Accept-Encoding": "zstd"})
        assert redirect.status_code == 307 and redirect.headers["location"].startswith(w.endpoint)
        fetched = httpx.get(redirect.headers["location"], headers={"Accept-Encoding": "zstd"})
        assert fetched.headers["content-encoding"] == "zstd" and fetched.content == plain
        assert get(path, "b", headers={"Accept-Encoding": "zstd"}).status_code == 404
        curl = ["curl", "-sfL", "--compressed", "-H", f"Authorization: Bearer {TOKENS['a']}", path]
        assert subprocess.run(curl, capture_output=True, check=True).stdout == plain
        with RemoteVault(url, TOKENS["a"]).open_core("c2") as f:
            assert f.read() == plain
        part = get(path, "a", headers={"Accept-Encoding": "zstd", "Range": "bytes=1048000-1048999"})
        assert part.status_code == 206 and part.content == plain[1048000:1049000]
        whole = get(path, "a", headers={"Accept-Encoding": "identity"})
        assert whole.status_code == 200 and whole.content == plain


def test_a_stopped_server_leaves_no_connection_to_the_store_open(
    s3_vault: tuple[config.Settings, servers.Seaweed], tmp_path: Path
) -> None:
    """The store's clients are closed with the server: their pooled connections go with it."""
    settings, w = s3_vault
    settings.s3.redirect_downloads = False  # the server reads the binary from the store itself
    binary, _ = vault(settings, tmp_path)
    before = servers.connections_to(w.s3_port)  # the test's own client's, left open by the helper
    with servers.asgi(create_app(settings, StaticTokens(tokens(tmp_path)))) as url:
        assert get(f"{url}/buildid/{BUILD_ID}/executable", "a").content == binary
        assert servers.connections_to(w.s3_port) - before  # kept in the client's pool for the next request
    assert servers.connections_to(w.s3_port) - before == set()


def serve_cli(cfg: Path, port: int) -> subprocess.Popen:
    cli = os.path.join(os.path.dirname(sys.executable), "corevault")
    return subprocess.Popen([cli, "-c", str(cfg), "serve", "--no-auth", "--listen", f"127.0.0.1:{port}"],
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


def s3_config(tmp_path: Path, w: servers.Seaweed, public: str) -> Path:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'state_dir = "{tmp_path}/state"\n[vault]\nstore = "s3://{w.bucket}/v"\n'
                   f'[vault.s3]\nendpoint = "{w.endpoint}"\naddressing = "path"\npublic_endpoint = "{public}"\n')  # fmt: skip
    return cfg


def test_redirects_to_an_address_that_is_not_the_store_stop_the_server_with_what_to_set(
    s3_vault: tuple[config.Settings, servers.Seaweed], tmp_path: Path
) -> None:
    """The server reaches the store, but the address its redirects name (where readers are sent)
    has nothing listening, or another service: `corevault serve` does not start, and says in one
    line what to set; through an address that is the store (a relay to it), it serves, and the
    redirect names that address; once that address stops answering, /healthz says so."""
    settings, w = s3_vault
    binary, _ = vault(settings, tmp_path)
    closed = servers.free_port()
    with servers.asgi(create_app(settings, StaticTokens(tokens(tmp_path)))) as other:  # not a store
        for public in (f"http://127.0.0.1:{closed}", other):
            server = serve_cli(s3_config(tmp_path, w, public), servers.free_port())
            _, err = server.communicate(timeout=120)
            assert server.returncode != 0
            [line] = err.strip().splitlines()
            assert public in line and "public_endpoint" in line and "redirect_downloads = false" in line, line
    with relay.relay(w.s3_port) as public:
        settings.s3.public_endpoint = public.endpoint
        app = create_app(settings, StaticTokens(tokens(tmp_path)))
        app.state.server.redirects.every = 0  # no reuse of the last answer in this test
        with servers.asgi(app) as url:
            assert httpx.get(f"{url}/healthz").json() == {"status": "ok"}
            redirect = get(f"{url}/buildid/{BUILD_ID}/executable", "a")
            assert redirect.status_code == 307 and redirect.headers["location"].startswith(public.endpoint)
            assert httpx.get(redirect.headers["location"]).content == binary
            public.close()
            health = httpx.get(f"{url}/healthz")
            assert health.status_code == 503 and "public_endpoint" in health.json()["detail"]


def with_core(settings: config.Settings, tmp_path: Path) -> bytes:
    """A crash ``c2`` of namespace ``a`` with a core (one zstd frame); returns the plain core."""
    import zstandard

    plain = os.urandom(300_000) + bytes(700_000)
    stored = zstandard.ZstdCompressor(write_checksum=True).compress(plain)
    (tmp_path / "core.zst").write_bytes(stored)
    stores.vault_store(settings).put_file(blobs.core_key("c2"), str(tmp_path / "core.zst"))
    meta = {"id": "c2", "time": int(time.time()), "pod": {"namespace": "a", "name": "web-2"},
            "core": {"size": len(plain), "stored_size": len(stored), "sha256": hashlib.sha256(plain).hexdigest()}}  # fmt: skip
    engine = catalog.connect(settings.catalog_url)
    with engine.begin() as conn:
        catalog.add_crash(conn, meta, "off")
    engine.dispose()
    return plain


#: (method, path, reader, extra headers): every answer of the download routes, and their neighbours
ASKED = [
    ("GET", f"/buildid/{BUILD_ID}/executable", "a", {}),
    ("GET", f"/buildid/{BUILD_ID}/executable?crash=c1", "a", {}),
    ("GET", f"/buildid/{BUILD_ID}/executable?crash=c2", "a", {}),  # c2 mapped nothing
    ("GET", f"/buildid/{BUILD_ID}/executable", "b", {}),  # another namespace's: as if none
    ("GET", f"/buildid/{BUILD_ID}/executable", None, {}),
    ("GET", "/buildid/not-a-key/executable", None, {}),
    ("GET", f"/buildid/{BUILD_ID}/executable", "a", {"Authorization": "Bearer not-a-token-of-ours"}),
    ("GET", f"/buildid/{'7f' * 20}/executable", "a", {}),
    ("GET", "/buildid/..%2Fetc/executable", "a", {}),  # no build-id: a path FastAPI answers
    ("GET", f"/buildid/{BUILD_ID}/debuginfo", "a", {}),  # no DWARF in it
    ("HEAD", f"/buildid/{BUILD_ID}/executable", "a", {}),
    ("GET", f"/buildid/{BUILD_ID}/executable", "a", {"Range": "bytes=1000-1999"}),
    ("GET", f"/buildid/{BUILD_ID}/executable", "a", {"Range": "bytes=-10"}),
    ("GET", f"/buildid/{BUILD_ID}/executable", "a", {"Range": f"bytes={6 << 20}-"}),
    ("POST", f"/buildid/{BUILD_ID}/executable", "a", {}),  # not a download: FastAPI's 405
    ("GET", f"/buildid/{BUILD_ID}/executable/", "a", {}),
    ("GET", "/api/v1/crashes/c2/core", "a", {}),
    ("GET", "/api/v1/crashes/c2/core", "a", {"Accept-Encoding": "zstd"}),
    ("GET", "/api/v1/crashes/c2/core", "a", {"Range": "bytes=299990-300009"}),
    ("HEAD", "/api/v1/crashes/c2/core", "a", {}),
    ("GET", "/api/v1/crashes/c2/core", "b", {}),
    ("GET", "/api/v1/crashes/nothing/core", "a", {}),
    ("GET", "/api/v1/crashes/c2/core", None, {}),
]


def answers(url: str) -> list[tuple[int, dict[str, str], bytes]]:
    """Each of :data:`ASKED` as ``url`` answers it: status, headers (but the date) and body."""
    got = []
    with httpx.Client(base_url=url, timeout=60) as client:
        for method, path, who, headers in ASKED:
            auth = {"Authorization": f"Bearer {TOKENS[who]}"} if who else {}
            r = client.request(method, path, headers={"Accept-Encoding": "identity", **auth, **headers})
            said = {k: v.replace(url, "URL") for k, v in r.headers.items() if k != "date"}
            got.append((r.status_code, said, r.content))
    return got


def requests_counted(url: str) -> dict[tuple[str, ...], float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {
        tuple(sorted(s.labels.items())): s.value  # type: ignore[misc]
        for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text)
        for s in family.samples
        if s.name == "corevault_http_requests_total"
    }


def test_downloads_past_fastapi_answer_and_count_as_their_routes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The download routes are answered by a short path past FastAPI's routing: every answer
    (refusals, 404s, ranges, HEAD, zstd or plain) is the one the routes themselves give, byte
    for byte and header for header, and the metrics count each under the same route."""
    from corevault.server.downloads import ShortPath

    settings = config.from_dict({"state_dir": str(tmp_path / "state")})
    binary, _ = vault(settings, tmp_path)
    plain = with_core(settings, tmp_path)
    short = create_app(settings, StaticTokens(tokens(tmp_path)))
    routed = create_app(settings, StaticTokens(tokens(tmp_path)))
    routed.user_middleware = [m for m in routed.user_middleware if m.cls is not ShortPath]
    taken: list[str] = []
    respond = ShortPath._respond

    async def spied(self: ShortPath, scope: dict, receive: object, send: object) -> None:
        taken.append(scope["path"])
        await respond(self, scope, receive, send)  # type: ignore[arg-type]

    monkeypatch.setattr(ShortPath, "_respond", spied)
    with servers.asgi(short) as short_url, servers.asgi(routed) as routed_url:
        got = answers(short_url)
        # all but the path of several parts, the POST and the trailing slash
        assert len(taken) == len(ASKED) - 3
        assert got == answers(routed_url)
        assert len(taken) == len(ASKED) - 3  # the routed app never took the short path
        assert requests_counted(short_url) == requests_counted(routed_url)
    status = {
        (method, path, who, tuple(h.items())): r[0]
        for (method, path, who, h), r in zip(ASKED, got, strict=True)
    }
    assert list(status.values()) == [
        200, 200, 404, 404, 401, 401, 401, 404, 404, 404, 200, 206, 206, 416, 405, 307,
        200, 200, 206, 200, 404, 404, 401,
    ]  # fmt: skip
    assert got[0][2] == binary and got[11][2] == binary[1000:2000] and got[12][2] == binary[-10:]
    assert got[10][1]["x-debuginfod-size"] == str(len(binary)) and got[10][2] == b""
    assert got[16][2] == plain and got[18][2] == plain[299_990:300_010]
    assert got[17][1]["content-encoding"] == "zstd" and got[19][2] == b""
    assert got[3][2] == got[7][2].replace(b"7f" * 20, BUILD_ID.encode())  # another namespace's: as none
    assert got[20][2] == got[21][2].replace(b"nothing", b"c2")


@pytest.mark.parametrize("access", [StaticTokens, _FarTokens])
def test_downloads_wait_in_a_worker_thread_only_on_what_may_wait_on_another_host(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, access: type[StaticTokens]
) -> None:
    """Token file, SQLite and a directory: the lookup runs on the event loop (no thread hop), on
    its own prepared connection; a reader check that may wait on another host sends it to a
    worker thread, as FastAPI would, with a connection of the pool."""
    import asyncio

    from corevault.vault.prepared import Prepared

    settings = config.from_dict({"state_dir": str(tmp_path / "state")})
    binary, _ = vault(settings, tmp_path)
    app = create_app(settings, access(tokens(tmp_path)))
    assert app.state.server.local is access.local
    on_loop: list[bool] = []
    prepared: list[bool] = []
    lookup = catalog.object_for

    def spied(*args: object, **kw: object) -> object:
        try:
            on_loop.append(asyncio.get_running_loop() is not None)
        except RuntimeError:
            on_loop.append(False)
        prepared.append(isinstance(args[0], Prepared))
        return lookup(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(catalog, "object_for", spied)
    with servers.asgi(app) as url:
        assert get(f"{url}/buildid/{BUILD_ID}/executable", "a").content == binary
        assert get(f"{url}/buildid/{BUILD_ID}/executable", "b").status_code == 404
        assert (
            get(f"{url}/buildid/{BUILD_ID}/executable", "a", headers={"Range": "bytes=5-9"}).content
            == binary[5:10]
        )
    assert on_loop == prepared == [access.local] * 3


def test_a_token_taken_out_of_the_file_downloads_nothing_more(tmp_path: Path) -> None:
    """Readers are not cached, on the event loop either: the next download after the token file
    changed (here: ``a`` taken out) asks the file again."""
    settings = config.from_dict({"state_dir": str(tmp_path / "state")})
    binary, _ = vault(settings, tmp_path)
    path = Path(tokens(tmp_path))
    app = create_app(settings, StaticTokens(str(path)))
    assert app.state.server.local
    with servers.asgi(app) as url:
        assert get(f"{url}/buildid/{BUILD_ID}/executable", "a").content == binary
        before = path.stat().st_mtime_ns
        path.write_text(path.read_text().split("[[token]]\n")[2].join(["[[token]]\n", ""]))
        os.utime(path, ns=(before + 10**9, before + 10**9))  # a later change, whatever the clock's grain
        assert get(f"{url}/buildid/{BUILD_ID}/executable", "a").status_code == 401
        assert get(f"{url}/buildid/{BUILD_ID}/executable", "b").status_code == 404  # b still reads, not a's


def test_a_token_file_changed_within_one_timestamp_tick_is_read_again(tmp_path: Path) -> None:
    """File times have a coarse grain, so a second write can keep the first's mtime: a token taken
    out that way (simulated by putting the mtime back, the size unchanged) is refused at the next
    request."""
    path = Path(tokens(tmp_path))
    held = StaticTokens(str(path))
    first = path.stat()
    assert held.principal(TOKENS["a"], lambda: ["a"]).name == "a"
    path.write_text(path.read_text().replace(TOKENS["a"], TOKENS["a"].replace("a-", "x-", 1)))
    os.utime(path, ns=(first.st_atime_ns, first.st_mtime_ns))  # the same tick as the first write
    assert path.stat().st_size == first.st_size
    with pytest.raises(Denied):
        held.principal(TOKENS["a"], lambda: ["a"])
    assert held.principal(TOKENS["b"], lambda: ["b"]).name == "b"


def test_a_token_file_caught_mid_write_lets_nobody_in_and_says_why(tmp_path: Path) -> None:
    """A token file rewritten in place is seen empty, cut mid-entry or cut inside a character:
    every request is refused with a 503 that says to retry (not a 500, not an open door) until
    the file is whole again, and then the new file's tokens alone count."""
    settings = config.from_dict({"state_dir": str(tmp_path / "state")})
    binary, _ = vault(settings, tmp_path)
    path = Path(tokens(tmp_path))
    whole = path.read_bytes()
    app = create_app(settings, StaticTokens(str(path)))
    url_of = f"/buildid/{BUILD_ID}/executable"
    with servers.asgi(app) as url:
        assert get(url + url_of, "a").content == binary
        revoked = whole.replace(b'name = "a"', b'name = "\xc3\xa5"').replace(TOKENS["a"].encode(), b"x" * 25)
        for partial in (b"", whole[: whole.index(b"namespaces", 30)], revoked[: revoked.index(b"\xa5")]):
            path.write_bytes(partial)
            for who in ("a", "b"):
                answer = get(url + url_of, who)
                assert answer.status_code == 503, (partial, answer.text)
                assert "retry later" in answer.json()["detail"] and str(path) not in answer.text
        path.write_bytes(revoked)
        assert get(url + url_of, "a").status_code == 401
        assert get(url + url_of, "b").status_code == 404  # b reads, not a's


def test_a_permission_written_as_a_string_is_refused_not_granted(tmp_path: Path) -> None:
    """``delete = "false"`` is truthy in Python: such a file is refused with the key named."""
    path = tmp_path / "tokens.toml"
    path.write_text(f'[[token]]\nname = "a"\ntoken = "{TOKENS["a"]}"\nnamespaces = ["a"]\ndelete = "false"\n')
    path.chmod(0o600)
    with pytest.raises(AccessError, match="delete = .false. is not true or false"):
        StaticTokens(str(path))
    path.write_text(path.read_text().replace('"false"', "false"))
    assert StaticTokens(str(path)).principal(TOKENS["a"], lambda: ["a"]).scope("delete") == frozenset()
