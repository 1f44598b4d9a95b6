"""``corevault serve``: the vault over HTTP, for people (web UI), programs (JSON API) and debuggers.

One ASGI application (FastAPI) over the catalog and blob store the agents fill:

- ``/api/v1/…``: crashes, groups, core and report downloads (see :mod:`corevault.server.api`);
- ``/buildid/<id>/executable|debuginfo``: a debuginfod server for the binaries the capture
  handler kept, so ``DEBUGINFOD_URLS`` makes gdb, eu-stack and drgn fetch a crash's binaries
  (these and the core downloads reach their handlers by a short path past FastAPI's routing:
  :mod:`corevault.server.downloads`);
- ``/``, ``/groups/…``, ``/crashes/…``: server-rendered pages (see :mod:`corevault.server.ui`);
- ``/metrics`` (Prometheus) and ``/healthz``, without credentials: neither tells anything about
  a crash. ``/healthz`` fails when the catalog is unreachable, or when downloads are redirected
  to a store address that does not answer (see :mod:`corevault.server.redirects`).

Every other request names its reader with a bearer token (or, for pages, the cookie the
login page sets) and sees only the namespaces :mod:`corevault.server.access` allows.
Handlers are plain functions: FastAPI runs them in its thread pool, where the catalog's
and the store's blocking calls belong. The downloads' handlers run on the event loop when
every call they make is local (:mod:`corevault.server.downloads`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exception_handlers import http_exception_handler
from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.exceptions import HTTPException as StarletteHTTPException

from corevault import config
from corevault.server import redirects
from corevault.server.access import COOKIE, Access, AccessError, Denied, Principal
from corevault.vault import catalog
from corevault.vault.crashes import LocalVault
from corevault.vault.prepared import Prepared


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "corevault_http_requests",
            "HTTP requests served",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.seconds = Histogram(
            "corevault_http_request_seconds",
            "Time to the end of the response",
            ["route"],
            registry=self.registry,
        )
        self.bytes = Counter(
            "corevault_served_bytes",
            "Bytes of cores and binaries sent (or redirected to the store)",
            ["what"],
            registry=self.registry,
        )


#: the methods counted by name; any other is "other". A client chooses the method: h11, uvicorn's
#: parser without httptools, takes any token, and each made a time series of its own that the
#: open /metrics served for ever
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})


class _Measure:
    """ASGI middleware counting requests by route template (never by crash id) and method."""

    def __init__(self, app: Callable, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = [500]

        async def sending(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            method = scope["method"] if scope["method"] in METHODS else "other"
            self.metrics.requests.labels(route, method, str(status[0])).inc()
            self.metrics.seconds.labels(route).observe(time.perf_counter() - started)


class Server:
    """What every handler needs: the vault, the access rules and the metrics."""

    def __init__(self, settings: config.Settings, access: Access) -> None:
        self.settings = settings
        self.vault = LocalVault(settings)
        self.access = access
        self.metrics = Metrics()
        #: signs the group page's state forms (see corevault.server.ui): one key for every server
        #: of the catalog, so that a form one gave out is taken by the others behind one address
        with self.vault.engine.begin() as conn:
            self.form_key = catalog.shared_key(conn, "form")
        #: whether the store answers the presigned URLs downloads are redirected to
        self.redirects = redirects.Check(self.vault)
        #: whether the readers, the catalog and the store are all on this host (a token file or
        #: none, SQLite, a directory): then downloads are answered on the event loop
        #: (see corevault.server.downloads)
        self.local = (
            access.local
            and self.vault.engine.dialect.name == "sqlite"
            and hasattr(self.vault.store, "local_path")
        )
        #: the downloads' lookups on the event loop: one connection of their own, each statement
        #: compiled once (see corevault.vault.prepared)
        self.lookups = Prepared(self.vault.engine) if self.local else None
        #: the alert dispatcher ``corevault serve`` runs beside it (on the catalog's engine), if any
        self.dispatcher: Any = None

    def close(self) -> None:
        """Let go of what the server opened: the alert thread first (it uses the catalog), the
        lookups' connection, the catalog's pool, the store's clients and the access check's
        connections. Called when the application shuts down; closing again closes only what was
        opened since."""
        if self.dispatcher is not None:
            self.dispatcher.stop()
            self.dispatcher = None
        if self.lookups is not None:
            self.lookups.close()
        self.vault.close()
        self.access.close()

    def namespaces(self) -> list[str]:
        with self.vault.engine.connect() as conn:
            return catalog.list_namespaces(conn)

    def principal(self, request: Request) -> Principal:
        """The reader, from ``Authorization: Bearer`` or (reads only) the login cookie; else 401."""
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer":
            token = ""
        if not token and request.method in ("GET", "HEAD"):
            token = request.cookies.get(COOKIE, "")
        return self.access.principal(token.strip() or None, self.namespaces)


def create_app(settings: config.Settings, access: Access) -> FastAPI:
    from corevault.server import api, downloads, ui

    server = Server(settings, access)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            server.close()  # a server stopped in-process leaves no descriptor of the catalog open

    app = FastAPI(
        lifespan=lifespan,
        title="corevault",
        version="1",
        summary="Core dumps of crashed pods and processes: lists, groups, reports, downloads, debuginfod.",
        docs_url=None,
        redoc_url=None,
        swagger_ui_oauth2_redirect_url=None,
        openapi_url="/api/v1/openapi.json",
    )
    app.state.server = server

    @app.exception_handler(Denied)
    def _denied(request: Request, exc: Denied) -> Any:
        if ui.wants_page(request):
            return ui.to_login(request)
        from fastapi.responses import JSONResponse

        return JSONResponse(
            {"detail": f"not authenticated: {exc}"},
            status_code=401,
            headers={"WWW-Authenticate": 'Bearer realm="corevault"'},
        )

    @app.exception_handler(AccessError)
    def _unusable_access(request: Request, exc: AccessError) -> Any:
        # The token file changed into something unusable (half written, damaged): nobody is let
        # in until it is fixed; the reader is told to retry, the log says what is wrong.
        from fastapi.responses import JSONResponse

        logging.getLogger("corevault.server").error("refusing every request: %s", exc)
        return JSONResponse(
            {"detail": "the server's access configuration cannot be used now; retry later"},
            status_code=503,
            headers={"Retry-After": "5"},
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Any:
        if ui.wants_page(request) and exc.status_code in (400, 403, 404):
            return ui.error_page(request, exc.status_code, str(exc.detail))
        return await http_exception_handler(request, exc)

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict:
        try:
            server.namespaces()
        except Exception as e:  # the catalog is the one thing the server cannot work without
            raise HTTPException(503, f"catalog unreachable: {e}") from None
        problem = server.redirects.problem()  # readers would get no binary
        if problem is not None:
            raise HTTPException(503, problem)
        return {"status": "ok"}

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Any:
        from fastapi.responses import Response
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.include_router(api.router)
    app.include_router(api.debuginfod)
    ui.mount(app)
    app.add_middleware(downloads.ShortPath, local=server.local)  # inside _Measure: counted alike
    app.add_middleware(_Measure, metrics=server.metrics)
    return app
