"""The web UI: server-rendered pages over the same functions as the JSON API.

Crash groups first, the way Sentry shows issues (signature, count, a trend of the last two
weeks, the namespaces and images hit), one click to a group's crashes and one more to a
crash's stack. No script or style comes from elsewhere: everything is in ``static/``, so
the UI works on a cluster without internet access. The only script copies commands to the
clipboard.

A group's page shows its state with the buttons that change it, its history, its images,
its trend and its newest crashes side by side. Its buttons post a form with the login
cookie and a token derived from it under a key that only the catalog's servers hold (one key
for all of them, kept in the catalog, so any server behind one address takes the form), so a
page elsewhere cannot post one.

Every value a page shows goes through :func:`corevault.printable.lines` before Jinja escapes
it: names come from crashed processes, and a right-to-left override or a zero-width mark in
one turns the rest of its line around or hides in it, on a page as in a terminal. They are
shown as their escapes (``\\u202e``), as the command line shows them.

Pages take the reader's token from a cookie the login page sets (HttpOnly, SameSite
Strict); the cookie is honoured for reads and the group page's own state forms only, so a
page on another site cannot make a browser remove a crash or change a group.
"""

from __future__ import annotations

import calendar
import hashlib
import hmac
import shlex
import time
from pathlib import Path
from typing import Annotated
from urllib.parse import quote, urlencode

from fastapi import APIRouter, FastAPI, Form, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from markupsafe import Markup
from pydantic import ValidationError

from corevault import printable
from corevault.server import api
from corevault.server.access import COOKIE, Denied

HERE = Path(__file__).parent
templates = Jinja2Templates(directory=HERE / "templates")
pages = APIRouter(include_in_schema=False, default_response_class=HTMLResponse)

SINCE = {"1h": 3600, "24h": 86400, "7d": 7 * 86400, "30d": 30 * 86400}
SIGNALS = ("SIGSEGV", "SIGABRT", "SIGBUS", "SIGFPE", "SIGILL", "SIGTRAP", "SIGSYS")


def wants_page(request: Request) -> bool:
    return not request.url.path.startswith(("/api/", "/buildid/", "/metrics", "/healthz", "/static/"))


def to_login(request: Request) -> Response:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return RedirectResponse(f"/login?next={quote(target)}", status_code=303)


def error_page(request: Request, status: int, detail: str) -> Response:
    response = _render(request, "error.html", status=status, detail=detail)
    response.status_code = status
    return response


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(t)) if t else "-"


def _ago(t: float | None) -> str:
    if not t:
        return "-"
    s = max(0, int(time.time() - t))
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= n:
            return f"{s // n}{unit} ago"
    return f"{s}s ago"


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    value = float(n)
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


templates.env.filters.update(
    when=_when, ago=_ago, size=_size, hex=lambda v: f"0x{v:x}" if v is not None else ""
)
templates.env.globals.update(quote=quote, basename=lambda p: (p or "").rsplit("/", 1)[-1])


def _shown(value: object) -> object:
    """What ``{{ value }}`` prints: text with its line breaks kept and every other character that
    is not printable as its escape; the templates' own markup (macros) as it is."""
    if isinstance(value, str) and not isinstance(value, Markup):
        return printable.lines(value)
    return value


templates.env.finalize = _shown


def _render(request: Request, name: str, **context: object) -> Response:
    srv = api.server(request)
    return templates.TemplateResponse(request, name, {"open_access": srv.access.open, **context})


def _since(value: str | None) -> int | None:
    return int(time.time()) - SINCE[value] if value in SINCE else None


Text = Annotated[str | None, Query(max_length=512)]


@pages.get("/")
def groups_page(
    request: Request,
    namespace: Text = None,
    image: Text = None,
    signal: Text = None,
    since: Text = None,
    state: Text = None,
    q: Text = None,
    new_in: Text = None,
    cursor: Text = None,
) -> Response:
    reader = api.principal(request)
    namespace, image, signal = namespace or None, image or None, signal or None
    page = api.list_groups(
        request, reader, namespace=namespace, image=image, signal=signal, since=_since(since), days=14,
        state=state or None, q=q or None, new_in=new_in or None, limit=50, cursor=cursor or None,
    )  # fmt: skip
    values = {"namespace": namespace, "image": image, "signal": signal, "since": since, "state": state, "q": q,
              "new_in": new_in}  # fmt: skip
    query = {k: v for k, v in values.items() if v}
    return _render(
        request, "groups.html", groups=page["items"], next=page["next"], query=query, urlencode=urlencode,
        namespaces=api.list_namespaces(request, reader), signals=SIGNALS, since_choices=list(SINCE),
        peak=max([max(g["daily"]) for g in page["items"]] + [1]), states=STATE_CHOICES,
    )  # fmt: skip


STATE_CHOICES = {"": "needs attention", "open": "open", "regressed": "regressed", "resolved": "resolved",
                 "ignored": "ignored", "all": "all"}  # fmt: skip


def _form_token(request: Request, token: str) -> str:
    """What a state form must send back: the login token's HMAC under this server's key (no CSRF)."""
    return hmac.new(api.server(request).form_key, token.encode(), hashlib.sha256).hexdigest()


def _compare(crashes: list[dict]) -> list[dict]:
    """The facts of crashes side by side, each row saying whether the crashes differ in it."""

    def others(crash: dict) -> str:
        threads = (crash.get("report") or {}).get("threads") or []
        tops = [(t.get("frames") or [{}])[0].get("function") or "??" for t in threads if not t.get("crashed")]
        return ", ".join(sorted(set(tops))) or "-"

    facts = (
        ("Time (UTC)", lambda c: _when(c["time"])),
        ("Pod", lambda c: f"{c['namespace']}/{c['pod']}" if c["namespace"] else "host"),
        ("Container", lambda c: c["container"] or "-"),
        ("Node", lambda c: c["node"] or "-"),
        ("Image", lambda c: c["image"] or "-"),
        ("Executable", lambda c: c["exe"] or "-"),
        ("Signal", lambda c: c["signal_name"] or "-"),
        ("Other threads' top frames", others),
    )
    rows = []
    for label, value in facts:
        values = [value(c) for c in crashes]
        rows.append({"label": label, "values": values, "differs": len(set(values)) > 1})
    return rows


@pages.get("/groups/{signature}")
def group_page(request: Request, signature: str) -> Response:
    reader = api.principal(request)
    group = api.group_detail(request, reader, signature)
    side = []
    for c in group["recent"][:4]:
        side.append(api.visible_crash(request, reader, c["id"]))
    token = request.cookies.get(COOKIE, "")
    return _render(
        request, "group.html", group=group, compare=_compare(side), side=side,
        form_token=_form_token(request, token) if token else "", peak=max(group["daily"] + [1]),
    )  # fmt: skip


@pages.post("/groups/{signature}/state")
def group_state_form(
    request: Request,
    signature: str,
    state: Annotated[str, Form(max_length=16)],
    form_token: Annotated[str, Form(max_length=128)],
    resolved_in: Annotated[str, Form(max_length=512)] = "",
    until: Annotated[str, Form(max_length=32)] = "",
    crashes: Annotated[str, Form(max_length=12)] = "",
    comment: Annotated[str, Form(max_length=2000)] = "",
) -> Response:
    """The group page's buttons: the login cookie plus a token only this server's page can know."""
    srv = api.server(request)
    token = request.cookies.get(COOKIE, "")
    if not token:
        raise Denied("log in to change a group")
    if not hmac.compare_digest(form_token, _form_token(request, token)):
        raise HTTPException(403, "this form is stale or did not come from this server: reload the page")
    reader = srv.access.principal(token, srv.namespaces)
    try:
        fields = {"state": state, "comment": comment.strip() or None}
        if state == "resolved":
            fields["resolved_in"] = resolved_in.strip() or None
        if state == "ignored":
            fields |= {"until": _form_date(until), "crashes": int(crashes) if crashes.strip() else None}
        change = api.state_change.validate_python(fields)
    except ValidationError as e:
        # its first line names only the model ("1 validation error for tagged-union[…]")
        first = e.errors()[0]
        field = f"{first['loc'][-1]}: " if len(first["loc"]) > 1 else ""
        raise HTTPException(400, f"cannot change the state as asked: {field}{first['msg']}") from None
    except ValueError as e:
        raise HTTPException(400, f"cannot change the state as asked: {str(e).splitlines()[0]}") from None
    api.change_state(request, reader, signature, change)
    return RedirectResponse(f"/groups/{quote(signature)}", status_code=303)


def _form_date(value: str) -> int | None:
    """A date input's ``YYYY-MM-DD`` (midnight UTC), or nothing."""
    if not value.strip():
        return None
    return int(calendar.timegm(time.strptime(value.strip(), "%Y-%m-%d")))


@pages.get("/crashes")
def crashes_page(
    request: Request,
    namespace: Text = None,
    pod: Text = None,
    image: Text = None,
    signal: Text = None,
    group: Text = None,
    since: Text = None,
    cursor: Text = None,
) -> Response:
    reader = api.principal(request)
    values = {"namespace": namespace, "pod": pod, "image": image, "signal": signal, "group": group}
    values = {k: v or None for k, v in values.items()}
    page = api.list_crashes(request, reader, **values, since=_since(since), limit=50, cursor=cursor or None)
    group_row = None
    if values["group"]:
        with api.server(request).vault.engine.connect() as conn:
            from corevault.vault import catalog

            found = catalog.list_groups(conn, 1, visible=reader.visible, signature=values["group"])
        group_row = found[0] if found else None
    query = {k: v for k, v in {**values, "since": since}.items() if v}
    return _render(
        request, "crashes.html", crashes=page["items"], next=page["next"], query=query, urlencode=urlencode,
        group=group_row, namespaces=api.list_namespaces(request, reader), signals=SIGNALS,
        since_choices=list(SINCE), peak=max((group_row or {}).get("daily") or [1]),
    )  # fmt: skip


@pages.get("/crashes/{crash_id}")
def crash_page(request: Request, crash_id: str) -> Response:
    reader = api.principal(request)
    crash = api.visible_crash(request, reader, crash_id)
    report = crash["report"]
    crashed, others = None, []
    if report:
        for t in report["threads"]:
            if t["crashed"] and crashed is None:
                crashed = t
            else:
                others.append(t)
    commands = [
        shlex.join(["corevault", "gdb", crash_id]),
        shlex.join(["corevault", "dump", crash_id, "-o", "core"]),
    ]
    if crash["pod"]:
        debug = ["kubectl", "corevault", "debug", crash["pod"], "-n", crash["namespace"]]
        if crash["container"]:
            debug += ["-c", crash["container"]]
        commands.insert(0, shlex.join(debug))
    env = crash["meta"]["process"]["environ"]  # a CrashRecord: every field is there
    return _render(
        request, "crash.html", crash=crash, report=report, crashed=crashed, others=others, commands=commands,
        environ=sorted(env.items()), meta=crash["meta"],
    )  # fmt: skip


@pages.get("/login")
def login_form(request: Request, next: Text = "/") -> Response:
    return _render(request, "login.html", next=_local(next), error=None)


@pages.post("/login")
def login(
    request: Request, token: Annotated[str, Form(max_length=8192)], next: Annotated[str, Form()] = "/"
) -> Response:
    srv = api.server(request)
    try:
        who = srv.access.principal(token.strip() or None, srv.namespaces)
    except Denied as e:
        return _render(request, "login.html", next=_local(next), error=str(e))
    response = RedirectResponse(_local(next), status_code=303)
    response.set_cookie(
        COOKIE,
        token.strip(),
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        max_age=8 * 3600,
    )
    response.headers["X-Corevault-User"] = who.name
    return response


@pages.post("/logout")
def logout() -> Response:
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(COOKIE)
    return response


def _local(target: str | None) -> str:
    """Only paths of this server: a login link must not send the token's owner elsewhere."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


def mount(app: FastAPI) -> None:
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    app.include_router(pages)
