"""The vault of a corevault server, through its HTTP API: the command line's remote mode.

:class:`RemoteVault` has the methods of :class:`corevault.vault.crashes.LocalVault`, so
``corevault list | info | dump | groups | rm | gdb`` work the same against a server
(``--server URL`` or ``$COREVAULT_SERVER``, with the token in ``$COREVAULT_TOKEN`` or a
file). The server decides what the token may see; its answers become the same one-line
errors and exit codes as local ones.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import BinaryIO

import httpx

from corevault import objectid
from corevault.errors import BadInput, NotFound, UserError
from corevault.vault.blobs import StreamBody
from corevault.vault.catalog import Filters
from corevault.vault.crashes import encode_cursor, plain


class RemoteVault:
    def __init__(self, url: str, token: str | None, timeout: float = 60.0) -> None:
        if not url.startswith(("http://", "https://")):
            raise BadInput(
                f"server {url!r}: give its URL with http:// or https://, e.g. http://127.0.0.1:8080"
            )
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.url = url.rstrip("/")
        # follow the server's redirects of binaries to its object store (httpx drops the token
        # on the way to another origin; the URL is signed)
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, follow_redirects=True)

    def _send(
        self,
        method: str,
        path: str,
        *,
        stream: bool = False,
        json: dict | None = None,
        headers: dict[str, str] | None = None,
        **params: object,
    ) -> httpx.Response:
        query = {k: v for k, v in params.items() if v is not None}
        request = self.http.build_request(method, path, params=query, json=json, headers=headers)
        try:
            response = self.http.send(request, stream=stream)
        except httpx.HTTPError as e:
            raise UserError(f"cannot reach the corevault server at {self.url}: {e}") from None
        if response.status_code < 400:
            return response
        if stream:
            response.read()
        try:
            detail = response.json().get("detail", response.text)
        except (ValueError, AttributeError):  # another HTTP service at that address, or a proxy's page
            detail = f"HTTP {response.status_code}, not an answer of a corevault server; check --server"
        if isinstance(detail, list):  # FastAPI's validation errors: name each bad field
            detail = "; ".join(f"{'.'.join(map(str, d.get('loc', [])[1:]))}: {d.get('msg')}" for d in detail)
        if response.status_code == 404:
            raise NotFound(f"{detail} (on {self.url})")
        if response.status_code == 401:
            if not self.http.headers.get("Authorization"):
                raise UserError(f"{self.url} needs a token: set COREVAULT_TOKEN or pass --token-file FILE")
            raise UserError(
                f"{self.url} did not accept the token ({detail}); "
                "set COREVAULT_TOKEN or --token-file to one it knows"
            )
        if response.status_code in (400, 422):  # a filter or value the server cannot take, as a local one is
            raise BadInput(f"{detail} (on {self.url})")
        raise UserError(f"{self.url}: {response.status_code} {detail}")

    def _json(self, method: str, path: str, **kw: object) -> dict:
        """The JSON answer of a request; one line when what answers is not a corevault server."""
        response = self._send(method, path, **kw)  # type: ignore[arg-type]
        try:
            return response.json()
        except ValueError:
            raise UserError(
                f"{self.url}{path} did not answer with JSON: is {self.url} a corevault server? check --server"
            ) from None

    def _body(self, chunks: Iterator[bytes], what: str) -> Iterator[bytes]:
        """``chunks`` of a streamed answer; a connection that breaks off midway is one line, no traceback."""
        try:
            yield from chunks
        except httpx.HTTPError as e:
            raise UserError(
                f"the download of {what} from {self.url} broke off ({e}); run the command again"
            ) from None

    def _pages(self, path: str, limit: int, cursor: str | None = None, **params: object) -> list[dict]:
        """Up to ``limit`` items of a paginated list, following its cursors."""
        rows: list[dict] = []
        while len(rows) < limit:
            page = self._json("GET", path, **params, limit=min(1000, limit - len(rows)), cursor=cursor)
            rows += page["items"]
            cursor = page.get("next")
            if not cursor:
                break
        return rows

    def list(self, filters: Filters, limit: int, before: tuple | None = None) -> list[dict]:
        skip = ("visible", "search")
        params = {k: getattr(filters, k) for k in Filters.__dataclass_fields__ if k not in skip}
        params["q"] = filters.search
        return self._pages("/api/v1/crashes", limit, encode_cursor(before) if before else None, **params)

    def get(self, crash_id: str) -> dict:
        return self._json("GET", f"/api/v1/crashes/{crash_id}")

    def groups(
        self, limit: int, *, state: str | None = None, search: str | None = None, new_in: str | None = None
    ) -> list[dict]:
        return self._pages("/api/v1/groups", limit, state=state, q=search, new_in=new_in)

    def group(self, signature: str) -> dict:
        return self._json("GET", f"/api/v1/groups/{signature}")

    def set_state(self, signature: str, change: dict, actor: str) -> dict:
        """The server records its own name for the token as the actor, not ``actor``."""
        body = {k: v for k, v in change.items() if v is not None}
        return self._json("POST", f"/api/v1/groups/{signature}/state", json=body)

    def open_core(self, crash_id: str) -> BinaryIO:
        """The plain core, streamed from the server: sent as the vault keeps it (zstd) and
        decompressed here, a MiB at a time (a core of zero pages is tiny compressed)."""
        response = self._send(
            "GET", f"/api/v1/crashes/{crash_id}/core", stream=True, headers={"Accept-Encoding": "zstd"}
        )
        body = StreamBody(self._body(response.iter_raw(1 << 20), f"the core of {crash_id}"), response.close)
        if response.headers.get("content-encoding", "").strip().lower() == "zstd":
            return plain(body)  # type: ignore[arg-type]
        return body  # type: ignore[return-value]

    def binary(self, crash_id: str, module: dict, dest: str) -> bool:
        """Fetch the file a crash's ``module`` names from the server's debuginfod endpoint."""
        key = module.get("key")
        if not isinstance(key, str) or not objectid.KEY.match(key):
            return False
        try:
            response = self._send("GET", f"/buildid/{key}/executable", stream=True, crash=crash_id)
        except NotFound:
            return False
        try:
            with open(dest, "wb") as f:
                for chunk in self._body(response.iter_bytes(1 << 20), f"the binary {key}"):
                    f.write(chunk)
        finally:
            response.close()
        return True

    def request_snapshot(
        self, namespace: str, pod: str, container: str | None, *, kill: bool, reason: str
    ) -> dict:
        body = {"namespace": namespace, "pod": pod, "container": container, "kill": kill, "reason": reason}
        return self._json("POST", "/api/v1/snapshots", json=body)

    def snapshot_status(self, request_id: str) -> dict:
        return self._json("GET", f"/api/v1/snapshots/{request_id}")

    def forget(self, crash_id: str) -> None:
        self._send("DELETE", f"/api/v1/crashes/{crash_id}")
