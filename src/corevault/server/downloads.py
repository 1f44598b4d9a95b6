"""The downloads' short way in: debuginfod and core downloads answered before FastAPI's routing.

A debugger asks for dozens of binaries per core, and a small binary's download is mostly the
server's fixed cost per request. :class:`ShortPath`, an ASGI middleware inside the metrics
middleware, matches the four download routes (GET and HEAD of ``/buildid/KEY/executable``,
``/buildid/KEY/debuginfo`` and ``/api/v1/crashes/ID/core``) itself and calls the very handlers
FastAPI would (:mod:`corevault.server.api`): the same reader, access check, lookup, headers and
body. Their errors go through the application's own exception handlers (Starlette's
``ExceptionMiddleware`` over ``app.exception_handlers``), so a 401 or 404 reads as on any other
route, and the request is counted under its route's template. Anything else (another method,
a trailing slash, every other path) goes on to FastAPI unchanged.

Where the handler runs:

- in a worker thread (one hop, as FastAPI runs a plain handler) when anything it calls may wait
  on another host: a Kubernetes TokenReview, a PostgreSQL query, an object store;
- on the event loop itself when the server is ``local``: its tokens are a file (or none), its
  catalog is SQLite and its store is a directory. Then all the handler does is an ``os.stat`` of
  the token file, an indexed SQLite lookup (WAL: a reader does not wait for writers) and an
  ``open``: the same local disk that ``sendfile`` reads on the event loop anyway. A hop to a
  thread and back took four context switches of the server per download against none
  (``/proc/PID/task/*/status``), each a wait for a CPU on a busy host (``docs/server.md``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.middleware.exceptions import ExceptionMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from corevault.server import api

Handler = Callable[[Request, str], Response]


def _crash(request: Request) -> str | None:
    """``?crash=ID``; a debugger asks without a query, which then is not parsed at all."""
    return request.query_params.get("crash") if request.scope["query_string"] else None


#: (path pattern, the FastAPI route's template, the handler given its one path parameter)
ROUTES: tuple[tuple[re.Pattern[str], str, Handler], ...] = (
    (
        re.compile(r"/buildid/([^/]+)/executable"),
        "/buildid/{build_id}/executable",
        lambda request, key: api.executable(request, key, _crash(request)),
    ),
    (
        re.compile(r"/buildid/([^/]+)/debuginfo"),
        "/buildid/{build_id}/debuginfo",
        lambda request, key: api.debuginfo(request, key, _crash(request)),
    ),
    (re.compile(r"/api/v1/crashes/([^/]+)/core"), "/api/v1/crashes/{crash_id}/core", api.download_core),
)
_TEMPLATES = frozenset(template for _, template, _ in ROUTES)
_DOWNLOAD = "corevault.download"


class ShortPath:
    """ASGI middleware: the download routes answered by their handlers without FastAPI's routing;
    ``local``: on the event loop (see the module's docstring), else in a worker thread."""

    def __init__(self, app: ASGIApp, local: bool) -> None:
        self.app = app
        self.local = local
        self._routes: dict[tuple[str, str], Any] = {}
        self._errors: ExceptionMiddleware | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in ("GET", "HEAD"):
            for pattern, template, handler in ROUTES:
                if match := pattern.fullmatch(scope["path"]):
                    errors = self._errors or self._prepare(scope["app"])
                    # counted (and traced) as FastAPI's own route for this request would be
                    scope["route"] = self._routes[template, scope["method"]]
                    scope[_DOWNLOAD] = handler, match.group(1)
                    await errors(scope, receive, send)
                    return
        await self.app(scope, receive, send)

    def _prepare(self, app: Any) -> ExceptionMiddleware:
        """The routes and exception handlers of ``app`` (the FastAPI application), on the first
        download, when all are registered. Starlette gives the handlers of 500 and ``Exception``
        to its outermost middleware, which answers the short path's unexpected errors too."""
        self._routes = {
            (r.path, method): r
            for r in (*api.router.routes, *api.debuginfod.routes)
            if getattr(r, "path", None) in _TEMPLATES
            for method in getattr(r, "methods", ())
        }
        handlers = {k: v for k, v in app.exception_handlers.items() if k not in (500, Exception)}
        self._errors = ExceptionMiddleware(self._respond, handlers=handlers)
        return self._errors

    async def _respond(self, scope: Scope, receive: Receive, send: Send) -> None:
        handler, param = scope[_DOWNLOAD]
        request = Request(scope, receive)
        if self.local:
            scope[api.ON_LOOP] = True
            response = handler(request, param)
        else:
            response = await run_in_threadpool(handler, request, param)
        await response(scope, receive, send)
