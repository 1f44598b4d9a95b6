"""``corevault serve``: the JSON API, debuginfod, metrics and namespace-scoped access.

A real uvicorn on 127.0.0.1 serves the checked-in crashes (``fixture_vault``): in namespace
``a`` a SIGFPE; in ``b`` the same bug and a SIGSEGV in a shared library (``b-lib``, whose
binaries nothing of ``a`` mapped); a host process's SIGFPE. Tokens for ``a`` must learn
nothing of ``b`` on any endpoint. Nothing here needs root; the tests that remove crashes
serve a copy of their own.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx
import pytest
import zstandard

from corevault.server.access import StaticTokens
from corevault.server.app import create_app
from corevault.vault import blobs
from testbed import servers
from tests.clirun import corevault
from tests.conftest import FixtureVault
from tests.nodes import CLI, Node

TOKENS = {
    "admin": "admin-token-0123456789",
    "a": "a-reader-token-0123456789",
    "b": "b-reader-token-0123456789",
    "a-admin": "a-admin-token-0123456789",
}


@dataclass
class Served:
    url: str
    node: Node
    app: object
    ids: dict[str, str]  # a, b, b-lib, host -> crash id
    build_ids: dict[str, str]  # file name of a mapped object -> build-id

    def get(self, path: str, who: str | None = "admin", **kw: object) -> httpx.Response:
        headers = {"Authorization": f"Bearer {TOKENS[who]}"} if who else {}
        return httpx.get(self.url + path, headers={**headers, **kw.pop("headers", {})}, **kw)  # type: ignore[arg-type]


@contextmanager
def serve(vault: FixtureVault) -> Iterator[Served]:
    """``vault`` behind a real uvicorn with the static tokens of :data:`TOKENS`."""
    tokens = os.path.join(vault.node.dir, "tokens.toml")
    with open(tokens, "w") as f:
        f.write(
            f'[[token]]\nname = "root"\ntoken = "{TOKENS["admin"]}"\nnamespaces = ["*"]\ndelete = true\n'
            f'[[token]]\nname = "alice"\nsha256 = "{hashlib.sha256(TOKENS["a"].encode()).hexdigest()}"\nnamespaces = ["a"]\n'
            f'[[token]]\nname = "bob"\ntoken = "{TOKENS["b"]}"\nnamespaces = ["b"]\n'
            f'[[token]]\nname = "carol"\ntoken = "{TOKENS["a-admin"]}"\nnamespaces = ["a"]\ndelete = true\n'
        )
    os.chmod(tokens, 0o600)
    app = create_app(vault.node.settings, StaticTokens(tokens))
    with servers.asgi(app) as url:
        yield Served(url, vault.node, app, vault.ids, vault.build_ids)


@pytest.fixture(scope="module")
def served(fixture_vault: FixtureVault) -> Iterator[Served]:
    """The shared vault, served: the tests that use it only read."""
    with serve(fixture_vault) as s:
        yield s


def test_crashes_are_listed_newest_first_and_paged(served: Served) -> None:
    everything = served.get("/api/v1/crashes").json()
    assert {c["id"] for c in everything["items"]} == set(served.ids.values()) and everything["next"] is None
    times = [c["time"] for c in everything["items"]]
    assert times == sorted(times, reverse=True)
    seen, cursor = [], None
    while True:
        page = served.get(
            "/api/v1/crashes", params={"limit": 1, **({"cursor": cursor} if cursor else {})}
        ).json()
        seen += [c["id"] for c in page["items"]]
        cursor = page["next"]
        if not cursor:
            break
    assert seen == [c["id"] for c in everything["items"]]
    assert [c["id"] for c in served.get("/api/v1/crashes", params={"signal": "SEGV"}).json()["items"]] == [
        served.ids["b-lib"]
    ]
    bad = served.get("/api/v1/crashes", params={"cursor": "not-a-cursor"})
    assert bad.status_code == 400 and "cursor" in bad.json()["detail"]


def test_groups_are_counted_over_the_readers_namespaces_only(served: Served) -> None:
    def groups(who: str) -> dict[str, dict]:
        return {g["signal_name"]: g for g in served.get("/api/v1/groups", who).json()["items"]}

    everyone = groups("admin")
    assert everyone["SIGFPE"]["count"] == 3 and everyone["SIGSEGV"]["count"] == 1
    assert everyone["SIGFPE"]["namespaces"] == ["a", "b"] and everyone["SIGFPE"]["images"] == [
        "registry.example/web:1"
    ]
    assert sum(everyone["SIGFPE"]["daily"]) == 3 and len(everyone["SIGFPE"]["daily"]) == 14
    only_a = groups("a")
    assert (
        list(only_a) == ["SIGFPE"]
        and only_a["SIGFPE"]["count"] == 1
        and only_a["SIGFPE"]["namespaces"] == ["a"]
    )
    assert sum(only_a["SIGFPE"]["daily"]) == 1
    only_b = groups("b")
    assert only_b["SIGFPE"]["count"] == 1 and only_b["SIGSEGV"]["count"] == 1
    assert only_b["SIGSEGV"]["title"] == "SIGSEGV in crashy_parse ← crashy_entry"
    assert served.get("/api/v1/namespaces", "a").json() == ["a"]
    assert served.get("/api/v1/namespaces", "admin").json() == ["a", "b"]


def _requests_for_b(served: Served) -> list[tuple[str, str]]:
    """Every route of the app and method, filled in with namespace b's crash, group and binary, or filtered to b."""
    b, lib = served.ids["b-lib"], served.build_ids["libcrashy.so"]
    group = served.get(f"/api/v1/crashes/{b}").json()["signature"]
    out = []
    for top in served.app.routes:  # type: ignore[attr-defined]
        for route in (
            getattr(top, "original_router", top).routes if hasattr(top, "original_router") else [top]
        ):
            path, methods = route.path, getattr(route, "methods", None) or set()
            if path in ("/healthz", "/metrics", "/login", "/logout", "/static", "/api/v1/openapi.json"):
                continue  # nothing about any crash behind these
            for method in methods:
                url = path.format(crash_id=b, build_id=lib, signature=group, rid="no-such-request")
                if "{" in path or path == "/api/v1/namespaces":
                    out.append((method, url))
                else:  # a list: asked for b by name, and unfiltered
                    out += [(method, url + "?namespace=b"), (method, url)]
    return out


def test_a_reader_of_a_learns_nothing_of_b_on_any_endpoint(served: Served) -> None:
    b_words = [
        served.ids["b"],
        "web-b-1",
        "parser-b-1",
        "crashy_parse",
        "registry.example/parser",
    ]
    walk = _requests_for_b(served)
    assert len({url.split("?")[0] for _, url in walk}) == 18, walk  # every API, debuginfod and page route
    b_group = served.get(f"/api/v1/crashes/{served.ids['b-lib']}").json()["signature"]
    for method, url in walk:
        r = httpx.request(
            method, served.url + url, headers={"Authorization": f"Bearer {TOKENS['a']}"},
            json={"state": "resolved"} if url.startswith("/api/") and url.endswith("/state")
            else {"namespace": "b", "pod": "some-pod"} if method == "POST" and "/snapshots" in url else None,
            data={"state": "resolved", "form_token": "0" * 64} if url.startswith("/groups/") and method == "POST" else None,
            cookies={"corevault_token": TOKENS["a"]} if url.startswith("/groups/") and method == "POST" else None,
        )  # fmt: skip
        # a snapshot request is for b's pod (a reader of a may not exec there), or names none that exists
        of_b = ("namespace=b", served.ids["b-lib"], "/buildid/", b_group, "/snapshots")
        if any(word in url for word in of_b):
            assert r.status_code in (403, 404), (method, url, r.status_code)
        else:
            assert r.status_code == 200, (method, url, r.status_code)
        body = r.text.replace(served.ids["b-lib"], "ID")  # the id it asked for, echoed in "no crash 'ID'"
        for word in b_words:
            assert word not in body, (method, url, word)
        if r.status_code == 404 and served.ids["b-lib"] in url:  # just as if there were no such crash
            ghost = httpx.request(
                method,
                served.url + url.replace(served.ids["b-lib"], "ID"),
                headers={"Authorization": f"Bearer {TOKENS['a']}"},
            )
            assert (ghost.status_code, ghost.text) == (r.status_code, body)
    # and the same objects are there for b
    assert served.get(f"/api/v1/crashes/{served.ids['b-lib']}", "b").status_code == 200
    assert served.get(f"/buildid/{served.build_ids['libcrashy.so']}/executable", "b").status_code == 200
    assert served.get(f"/buildid/{served.build_ids['crasher']}/executable", "a").status_code == 200
    # a host process's crash is for readers of every namespace only
    assert served.get(f"/api/v1/crashes/{served.ids['host']}", "a").status_code == 404
    assert served.get(f"/api/v1/crashes/{served.ids['host']}", "admin").status_code == 200


def test_requests_without_a_good_token_are_refused(served: Served) -> None:
    r = served.get("/api/v1/crashes", None)
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
    r = httpx.get(served.url + "/api/v1/crashes", headers={"Authorization": "Bearer wrong-token-000000000"})
    assert r.status_code == 401 and "unknown token" in r.json()["detail"]
    r = served.get(f"/buildid/{served.build_ids['crasher']}/executable", None)
    assert r.status_code == 401
    page = served.get("/crashes", None, follow_redirects=False)
    assert page.status_code == 303 and page.headers["location"] == "/login?next=/crashes"
    # the login cookie is a read credential only: it cannot remove a crash
    login = httpx.post(served.url + "/login", data={"token": TOKENS["admin"], "next": "//evil.example/"})
    assert login.status_code == 303 and login.headers["location"] == "/"
    cookie = login.cookies
    assert httpx.get(served.url + "/api/v1/crashes", cookies=cookie).status_code == 200
    r = httpx.delete(served.url + f"/api/v1/crashes/{served.ids['host']}", cookies=cookie)
    assert r.status_code == 401
    bad = httpx.post(served.url + "/login", data={"token": "nope-nope-nope-nope"})
    assert bad.status_code == 200 and "Not accepted" in bad.text


def _plain_core(served: Served, crash_id: str) -> bytes:
    with served.node.vault().store.open(blobs.core_key(crash_id)) as f:
        return zstandard.ZstdDecompressor().stream_reader(f).read()


def test_core_download_streams_the_plain_core_with_ranges(served: Served) -> None:
    crash_id = served.ids["b-lib"]
    plain = _plain_core(served, crash_id)
    url = f"/api/v1/crashes/{crash_id}/core"
    whole = served.get(url, headers={"Accept-Encoding": "identity"})  # zstd: test_seekable.py
    assert whole.status_code == 200 and whole.content == plain
    assert whole.headers["content-length"] == str(len(plain)) and whole.headers["accept-ranges"] == "bytes"
    part = served.get(url, headers={"Range": "bytes=4096-8191"})
    assert part.status_code == 206 and part.content == plain[4096:8192]
    assert part.headers["content-range"] == f"bytes 4096-8191/{len(plain)}"
    tail = served.get(url, headers={"Range": "bytes=-100"})
    assert tail.status_code == 206 and tail.content == plain[-100:]
    resume = served.get(url, headers={"Range": f"bytes={len(plain) - 10}-"})
    assert resume.content == plain[-10:]
    past = served.get(url, headers={"Range": f"bytes={len(plain)}-"})
    assert past.status_code == 416 and past.headers["content-range"] == f"bytes */{len(plain)}"
    changed = served.get(url, headers={"Range": "bytes=0-9", "If-Range": '"another-etag"'})
    assert changed.status_code == 200 and changed.content == plain
    head = httpx.head(
        served.url + url,
        headers={"Authorization": f"Bearer {TOKENS['admin']}", "Accept-Encoding": "identity"},
    )
    assert (
        head.status_code == 200 and head.headers["content-length"] == str(len(plain)) and head.content == b""
    )


def test_report_download(served: Served) -> None:
    crash_id = served.ids["b-lib"]
    crash = served.get(f"/api/v1/crashes/{crash_id}").json()
    report = served.get(f"/api/v1/crashes/{crash_id}/report")
    assert report.json() == crash["report"] and "attachment" in report.headers["content-disposition"]
    text = served.get(f"/api/v1/crashes/{crash_id}/report", params={"format": "text"}).text
    assert "Stack trace of thread" in text and "crashy_parse" in text


def test_secret_looking_environment_is_not_stored(served: Served) -> None:
    crash = served.get(f"/api/v1/crashes/{served.ids['b-lib']}").json()
    env = crash["meta"]["process"]["environ"]
    assert env["DB_PASSWORD"] == "REDACTED" and env["PATH"] == "/bin:/app"
    store = served.node.vault().store
    with store.open(blobs.meta_key(served.ids["b-lib"])) as f:
        assert b"hunter2" not in f.read()
    assert "hunter2" not in served.get(f"/crashes/{served.ids['b-lib']}").text


def test_metrics_and_health(served: Served) -> None:
    assert httpx.get(served.url + "/healthz").json() == {"status": "ok"}
    served.get("/api/v1/crashes")
    text = httpx.get(served.url + "/metrics").text
    assert 'corevault_http_requests_total{method="GET",route="/api/v1/crashes",status="200"}' in text
    assert "corevault_served_bytes_total" in text
    assert served.ids["a"] not in text  # routes are counted by template, never by crash id


def test_metrics_count_methods_a_client_makes_up_as_one(fixture_vault: FixtureVault, tmp_path) -> None:
    """A client chooses the method of a request, and uvicorn without httptools (h11) takes any
    token: each made-up one was a time series of the open /metrics, kept for ever."""
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(f'[[token]]\nname = "root"\ntoken = "{TOKENS["admin"]}"\nnamespaces = ["*"]\n')
    tokens.chmod(0o600)
    app = create_app(fixture_vault.node.settings, StaticTokens(str(tokens)))
    with servers.asgi(app, http="h11") as url, httpx.Client() as client:
        for i in range(40):
            client.request(f"MADEUP{i}", url + "/api/v1/crashes")
        client.get(url + "/healthz")
        text = client.get(url + "/metrics").text
    methods = set(re.findall(r'corevault_http_requests_total\{method="([^"]*)"', text))
    assert methods == {"GET", "other"}, methods


DRGN_BT = """
import sys, drgn
prog = drgn.Program()
prog.set_core_dump(sys.argv[1])
prog.set_enabled_debug_info_finders(["debuginfod"])
try:
    prog.load_default_debug_info()
except drgn.MissingDebugInfoError:
    pass  # the system libraries' DWARF: not held
for frame in prog.crashed_thread().stack_trace():
    try:
        print(frame.name, "at", "%s:%s:%s" % frame.source())
    except LookupError:
        print(frame.name)
"""


def test_gdb_eu_stack_and_drgn_fetch_binaries_through_debuginfod(served: Served, tmp_path) -> None:
    """With no binary on disk, real gdb, eu-stack and drgn symbolize the crash from the server alone."""
    crash_id = served.ids["b-lib"]
    core = tmp_path / "core"
    core.write_bytes(_plain_core(served, crash_id))
    headers = tmp_path / "headers"
    headers.write_text(f"Authorization: Bearer {TOKENS['b']}\n")
    env = {
        **os.environ, "DEBUGINFOD_URLS": served.url, "DEBUGINFOD_HEADERS_FILE": str(headers),
        "DEBUGINFOD_CACHE_PATH": str(tmp_path / "cache"), "DEBUGINFOD_TIMEOUT": "30",
    }  # fmt: skip
    gdb = subprocess.run(
        ["gdb", "-batch", "-nx", "-iex", "set debuginfod enabled on", "-ex", "bt", "-c", str(core)],
        capture_output=True, text=True, env=env, timeout=300, check=False, cwd=tmp_path,
    )  # fmt: skip
    frames = [line for line in gdb.stdout.splitlines() if line.startswith("#")]
    assert any(" crashy_parse (" in f for f in frames) and any(" main (" in f for f in frames), (
        gdb.stdout + gdb.stderr
    )
    lib = served.build_ids["libcrashy.so"]
    assert (tmp_path / "cache" / lib / "executable").exists()
    shutil.rmtree(tmp_path / "cache")
    stack = subprocess.run(
        ["eu-stack", "--core", str(core)], capture_output=True, text=True, env=env, timeout=300, check=False
    )
    assert "crashy_parse" in stack.stdout and " main" in stack.stdout, stack.stdout + stack.stderr
    shutil.rmtree(tmp_path / "cache")
    drgn = subprocess.run(
        [sys.executable, "-c", DRGN_BT, str(core)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert "crashy_parse at " in drgn.stdout and "libcrashy.c:" in drgn.stdout, drgn.stdout + drgn.stderr
    # a reader of another namespace gets nothing from debuginfod either
    headers.write_text(f"Authorization: Bearer {TOKENS['a']}\n")
    shutil.rmtree(tmp_path / "cache")
    blind = subprocess.run(
        ["eu-stack", "--core", str(core)], capture_output=True, text=True, env=env, timeout=300, check=False
    )
    assert "crashy_parse" not in blind.stdout


def test_debuginfo_is_served_only_for_binaries_with_dwarf(served: Served) -> None:
    lib = served.build_ids["libcrashy.so"]  # built with -g
    r = served.get(f"/buildid/{lib}/debuginfo")
    assert r.status_code == 200 and r.content[:4] == b"\x7fELF"
    assert r.content == served.get(f"/buildid/{lib}/executable").content
    crash = served.get(f"/api/v1/crashes/{served.ids['b-lib']}").json()
    loader = next(m["build_id"] for m in crash["meta"]["modules"] if "ld-linux" in m["path"])
    assert served.get(f"/buildid/{loader}/executable").status_code == 200
    assert served.get(f"/buildid/{loader}/debuginfo").status_code == 404  # the captured loader is stripped
    libc = next(m["build_id"] for m in crash["meta"]["modules"] if "libc.so" in m["path"])
    assert served.get(f"/buildid/{libc}/executable").status_code == 404  # mapped, but not held
    assert served.get("/buildid/..%2f..%2fetc%2fpasswd/executable").status_code == 404


def _cli(served: Served, who: str, *args: str) -> subprocess.CompletedProcess:
    env = {"COREVAULT_SERVER": served.url, "COREVAULT_TOKEN": TOKENS[who], "COREVAULT_CONFIG": None}
    return corevault(*args, env=env)


def _cli_child(served: Served, who: str, *args: str) -> subprocess.CompletedProcess:
    """In a child: ``corevault gdb`` runs gdb, whose output goes to the file descriptors."""
    env = {**os.environ, "COREVAULT_SERVER": served.url, "COREVAULT_TOKEN": TOKENS[who]}
    env.pop("COREVAULT_CONFIG", None)
    return subprocess.run([CLI, *args], capture_output=True, text=True, env=env, timeout=300, check=False)


def test_cli_remote_mode(served: Served, tmp_path) -> None:
    rows = [json.loads(line) for line in _cli(served, "b", "list", "--json").stdout.splitlines()]
    assert {r["id"] for r in rows} == {served.ids["b"], served.ids["b-lib"]}
    info = _cli(served, "b", "info", served.ids["b-lib"])
    assert "SIGSEGV in crashy_parse ← crashy_entry" in info.stdout and "parser-b-1" in info.stdout
    missing = _cli(served, "a", "info", served.ids["b-lib"])
    assert missing.returncode == 4 and "no crash" in missing.stderr
    out = tmp_path / "core"
    assert _cli(served, "b", "dump", served.ids["b-lib"], "-o", str(out)).returncode == 0
    assert out.read_bytes() == _plain_core(served, served.ids["b-lib"])
    groups = json.loads(_cli(served, "a", "groups", "--json").stdout)
    assert [(g["signal_name"], g["count"]) for g in groups] == [("SIGFPE", 1)]
    gdb = _cli_child(served, "b", "gdb", served.ids["b-lib"], "--batch", "--", "-ex", "bt")
    assert " crashy_parse (" in gdb.stdout, gdb.stdout + gdb.stderr
    denied = _cli(served, "a", "rm", served.ids["a"])
    assert denied.returncode == 1 and "may read but not remove" in denied.stderr
    unreachable = subprocess.run(
        [CLI, "--server", "http://127.0.0.1:9", "list"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert unreachable.returncode == 1 and "cannot reach the corevault server" in unreachable.stderr


CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]  # fmt: skip


@pytest.mark.servers
def test_browser_from_the_group_list_to_a_crash_and_its_core(
    served: Served, tmp_path, screenshots: str
) -> None:
    """Headless Chromium logs in, clicks a group, then a crash, and downloads its core."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1366, "height": 768}, accept_downloads=True)
            page.goto(served.url + "/")
            assert page.url.endswith("/login?next=/")
            page.fill("input[name=token]", TOKENS["admin"])
            page.click("form[action='/login'] button")
            page.wait_for_url(served.url + "/")
            assert page.locator("table.groups tbody tr").count() == 2
            assert "SIGSEGV in crashy_parse ← crashy_entry" in page.inner_text("table.groups")
            page.screenshot(path=os.path.join(screenshots, "groups.png"), full_page=True)

            page.click("text=SIGSEGV in crashy_parse ← crashy_entry")
            page.wait_for_url("**/groups/*")
            assert "registry.example/parser:2" in page.inner_text("#per-image")
            page.click("text=all crashes of this group")
            page.wait_for_url("**/crashes?group=*")
            assert page.locator("table.crashes tbody tr").count() == 1 and "parser-b-1" in page.inner_text(
                "table.crashes"
            )
            page.screenshot(path=os.path.join(screenshots, "group.png"), full_page=True)

            page.click("a.crash-link")
            page.wait_for_url(f"**/crashes/{served.ids['b-lib']}")
            stack = page.inner_text("#crashed-stack")
            assert "crashy_parse" in stack and "libcrashy.c:" in stack and "main" in stack
            assert "kubectl corevault debug parser-b-1 -n b -c parser" in page.inner_text(".actions")
            assert f"corevault gdb {served.ids['b-lib']}" in page.inner_text(".actions")
            page.screenshot(path=os.path.join(screenshots, "crash.png"), full_page=True)

            with page.expect_download() as download:
                page.click("#download-core")
            saved = tmp_path / "core"
            download.value.save_as(saved)
            assert saved.read_bytes() == _plain_core(served, served.ids["b-lib"])
            assert download.value.suggested_filename == f"core-{served.ids['b-lib']}"

            # another reader, in a fresh browser context: namespace a only
            other = browser.new_page(viewport={"width": 1366, "height": 768})
            other.goto(served.url + "/login")
            other.fill("input[name=token]", TOKENS["a"])
            other.click("form[action='/login'] button")
            other.wait_for_url(served.url + "/")
            assert (
                "crashy_parse" not in other.content() and other.locator("table.groups tbody tr").count() == 1
            )
            response = other.goto(f"{served.url}/crashes/{served.ids['b-lib']}")
            assert response is not None and response.status == 404 and "Not found" in other.inner_text("h1")
        finally:
            browser.close()


def test_removing_a_crash_takes_it_out_of_the_counts(fixture_vault_copy: FixtureVault) -> None:
    with serve(fixture_vault_copy) as served:
        r = httpx.delete(
            served.url + f"/api/v1/crashes/{served.ids['a']}",
            headers={"Authorization": f"Bearer {TOKENS['b']}"},
        )
        assert r.status_code == 404  # b cannot even tell that a's crash exists
        r = httpx.delete(
            served.url + f"/api/v1/crashes/{served.ids['a']}",
            headers={"Authorization": f"Bearer {TOKENS['a-admin']}"},
        )
        assert r.status_code == 204
        assert served.get(f"/api/v1/crashes/{served.ids['a']}").status_code == 404
        assert served.get("/api/v1/groups", "a").json()["items"] == []
        fpe = next(g for g in served.get("/api/v1/groups").json()["items"] if g["signal_name"] == "SIGFPE")
        assert fpe["count"] == 2 and fpe["namespaces"] == ["b"]
        assert _cli(served, "admin", "rm", served.ids["host"]).returncode == 0
        fpe = next(g for g in served.get("/api/v1/groups").json()["items"] if g["signal_name"] == "SIGFPE")
        assert fpe["count"] == 1


def test_kubernetes_mode_asks_the_api_server_who_may_read_what(served: Served, tmp_path) -> None:
    """TokenReview for the caller's token, then SubjectAccessReview of "get pods" per namespace."""
    from corevault.kube import cluster
    from corevault.server.access import KubeAccess
    from testbed.fakekube import FakeKube

    fake = FakeKube().start()
    try:
        fake.users = {
            "alice-token": ("alice", ["dev"]),
            "ops-token": ("olga", ["system:authenticated", "sre"]),
        }
        fake.grants = {("alice", "get", "pods", "b"), ("sre", "get", "pods", "*")}
        api = cluster.api_client(fake.kubeconfig(str(tmp_path / "kubeconfig")))
        app = create_app(served.node.settings, KubeAccess(api))
        with servers.asgi(app) as url:

            def get(path: str, token: str | None) -> httpx.Response:
                return httpx.get(url + path, headers={"Authorization": f"Bearer {token}"} if token else {})

            alice = {c["id"] for c in get("/api/v1/crashes", "alice-token").json()["items"]}
            assert alice == {served.ids["b"], served.ids["b-lib"]}
            assert get("/api/v1/crashes?namespace=a", "alice-token").status_code == 403
            assert get(f"/api/v1/crashes/{served.ids['b-lib']}/core", "alice-token").status_code == 200
            assert [g["count"] for g in get("/api/v1/groups", "alice-token").json()["items"]] == [1, 1]
            everything = {c["id"] for c in get("/api/v1/crashes", "ops-token").json()["items"]}
            assert {served.ids["b"], served.ids["b-lib"]} <= everything  # cluster-wide: all of them
            nobody = get("/api/v1/crashes", "stolen-token")
            assert nobody.status_code == 401 and "does not accept this token" in nobody.json()["detail"]
            assert get("/api/v1/crashes", None).status_code == 401
            r = httpx.delete(
                url + f"/api/v1/crashes/{served.ids['b-lib']}",
                headers={"Authorization": "Bearer alice-token"},
            )
            assert r.status_code == 403  # may get pods in b, not delete them
            # the fake answers HTTP/1.0 and closes each connection; an API server keeps them in this pool
            assert api.rest_client.pool_manager.pools
        assert not api.rest_client.pool_manager.pools  # closed with the server
    finally:
        fake.stop()
    reviews = [r.body for r in fake.requests if r.path.endswith("subjectaccessreviews")]
    asked = {
        (
            r["spec"]["user"],
            r["spec"]["resourceAttributes"].get("namespace"),
            r["spec"]["resourceAttributes"]["verb"],
        )
        for r in reviews
    }  # type: ignore[index]
    assert (
        ("alice", "b", "get") in asked
        and ("alice", None, "get") in asked
        and ("alice", "b", "delete") in asked
    )
    assert all(r["spec"]["resourceAttributes"]["resource"] == "pods" for r in reviews)  # type: ignore[index]
    tokens = [r.body["spec"]["token"] for r in fake.requests if r.path.endswith("tokenreviews")]  # type: ignore[index]
    assert tokens.count("alice-token") == 1  # reviewed once, then cached


def test_serve_refuses_to_open_everything_beyond_loopback(tmp_path) -> None:
    for args, words, code in (
        (["serve", "--no-auth", "--listen", "0.0.0.0:8080"], "allowed on 127.0.0.1 only", 1),
        (["serve"], "say how readers are checked", 2),
        (["serve", "--tokens", str(tmp_path / "none.toml")], "none.toml", 1),
        (["serve", "--no-auth", "--listen", "nonsense"], "use HOST:PORT", 2),
    ):
        out = subprocess.run([CLI, *args], capture_output=True, text=True, check=False, timeout=60)
        assert out.returncode == code and words in out.stderr, out.stderr
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    loose = tmp_path / "tokens.toml"
    loose.write_text('[[token]]\nname = "x"\ntoken = "0123456789abcdef"\nnamespaces = ["*"]\n')
    loose.chmod(0o644)
    out = subprocess.run([CLI, "serve", "--tokens", str(loose)], capture_output=True, text=True, check=False)
    assert out.returncode == 1 and "readable by others" in out.stderr


def _catalog_fds(catalog_path: str) -> set[tuple[str, str]]:
    """This process's descriptors of the catalog's files (the database, its WAL and shared memory)."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # the directory's own descriptor, closed as it was listed
        if target.startswith(catalog_path):
            found.add((fd, target))
    return found


def test_a_stopped_server_leaves_no_descriptor_of_the_catalog_open(fixture_vault_copy: FixtureVault) -> None:
    """The lookups' own connection (downloads on the event loop) and the catalog's pool are
    closed when the server shuts down: a server started and stopped in one process leaks neither."""
    url = fixture_vault_copy.node.settings.catalog_url
    assert url.startswith("sqlite:///")
    path = os.path.realpath(url.removeprefix("sqlite:///"))
    before = _catalog_fds(path)
    with serve(fixture_vault_copy) as served:
        assert served.app.state.server.lookups is not None  # downloads are looked up on their own connection
        build_id = next(iter(served.build_ids.values()))
        assert served.get(f"/buildid/{build_id}/executable").status_code == 200
        assert served.get("/api/v1/crashes").json()["items"]
        serving = _catalog_fds(path) - before
        assert serving  # open while serving: what is checked below can be seen
    assert _catalog_fds(path) - before == set()
    served.app.state.server.close()  # again, as corevault serve's last step does: harmless
    assert _catalog_fds(path) - before == set()
