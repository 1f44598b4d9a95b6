"""Crash groups' lifecycle, search and per-image views through the API, the web UI (Chromium) and the CLI.

The vault is filled through the catalog's own functions (:mod:`tests.triage_data`):
group ``shared`` crashed in namespaces a and b, ``only-a`` in a, ``only-b`` in b. A group
has a state per namespace: a reader changes it in the namespaces they may read and update.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from corevault import config
from corevault.server.access import StaticTokens
from corevault.server.app import create_app
from corevault.vault import catalog
from testbed import servers
from tests.clirun import corevault
from tests.triage_data import add

CLI = os.path.join(os.path.dirname(sys.executable), "corevault")
NOW = int(time.time())
TOKENS = {
    "admin": "admin-token-0123456789",  # every namespace, update
    "a": "a-reader-token-0123456789",  # reads a
    "a-ops": "a-ops-token-0123456789",  # reads and updates a
    "ab-ops": "ab-ops-token-0123456789",  # reads and updates a and b
}
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]  # fmt: skip


@dataclass
class Served:
    url: str
    dir: str
    settings: config.Settings
    ids: dict[str, str]

    def get(self, path: str, who: str = "admin", **kw: object) -> httpx.Response:
        return httpx.get(self.url + path, headers={"Authorization": f"Bearer {TOKENS[who]}"}, **kw)  # type: ignore[arg-type]

    def post(self, path: str, who: str, body: dict) -> httpx.Response:
        return httpx.post(self.url + path, headers={"Authorization": f"Bearer {TOKENS[who]}"}, json=body)

    def cli(self, who: str | None, *args: str) -> subprocess.CompletedProcess:
        env: dict[str, str | None] = {k: None for k in os.environ if k.startswith("COREVAULT_")}
        if who:
            env |= {"COREVAULT_SERVER": self.url, "COREVAULT_TOKEN": TOKENS[who]}
            return corevault(*args, env=env)
        return corevault("-c", os.path.join(self.dir, "c.toml"), *args, env=env)


@pytest.fixture
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """A vault and its server of each test's own: the tests change groups' states."""
    d = tmp_path_factory.mktemp("triage")
    (d / "c.toml").write_text(f'state_dir = "{d}/state"\n')
    settings = config.load(str(d / "c.toml"))
    engine = catalog.connect(settings.catalog_url)
    ids = {
        "shared-a": add(engine, signature="shared", frames=["Cache::evict", "main"], namespace="a", pod="cache-a-1",
                        image="registry.example/cache:3", when=NOW - 7200, node="node-1"),
        "shared-b": add(engine, signature="shared", frames=["Cache::evict", "main"], namespace="b", pod="cache-b-9",
                        image="registry.example/cache:4", when=NOW - 3600, node="node-2"),
        "only-a": add(engine, signature="only-a", frames=["Parser::readHeader", "main"], namespace="a",
                      pod="parser-a-1", image="registry.example/parser:1", when=NOW - 600),
        "only-b": add(engine, signature="only-b", frames=["secretFunctionOfB", "main"], namespace="b",
                      pod="vault-b-1", image="registry.example/b-only:1", when=NOW - 300, signal="SIGABRT"),
    }  # fmt: skip
    engine.dispose()
    tokens = d / "tokens.toml"
    tokens.write_text(
        f'[[token]]\nname = "root"\ntoken = "{TOKENS["admin"]}"\nnamespaces = ["*"]\nupdate = true\n'
        f'[[token]]\nname = "alice"\nsha256 = "{hashlib.sha256(TOKENS["a"].encode()).hexdigest()}"\nnamespaces = ["a"]\n'
        f'[[token]]\nname = "olga"\ntoken = "{TOKENS["a-ops"]}"\nnamespaces = ["a"]\nupdate = true\n'
        f'[[token]]\nname = "sam"\ntoken = "{TOKENS["ab-ops"]}"\nnamespaces = ["a", "b"]\nupdate = true\n'
    )
    tokens.chmod(0o600)
    with servers.asgi(create_app(settings, StaticTokens(str(tokens)))) as url:
        yield Served(url, str(d), settings, ids)


def _state(served: Served, signature: str) -> str:
    return served.get(f"/api/v1/groups/{signature}").json()["status"]["state"]


def test_state_changes_apply_in_the_namespaces_the_reader_may_update(served: Served) -> None:
    resolve = {"state": "resolved", "comment": "fixed by #evict-fix"}
    r = served.post("/api/v1/groups/shared/state", "a", resolve)
    assert r.status_code == 403 and "update on pods in a namespace" in r.json()["detail"]
    assert served.post("/api/v1/groups/only-b/state", "a-ops", resolve).status_code == 404  # b's: unseen
    r = served.post("/api/v1/groups/shared/state", "a-ops", resolve)  # may update a: resolved in a only
    assert r.status_code == 200 and r.json()["status"]["state"] == "resolved"
    assert r.json()["changes_in"] == ["a"]
    assert [s["namespace"] for s in r.json()["status"]["namespaces"]] == ["a"]
    assert _state(served, "shared") == "open"  # b's is open still: the most urgent of a and b
    each = served.get("/api/v1/groups/shared").json()["status"]["namespaces"]
    assert [(s["namespace"], s["state"]) for s in each] == [("a", "resolved"), ("b", "open")]
    assert served.post("/api/v1/groups/shared/state", "admin", {"state": "open"}).status_code == 200
    r = served.post(
        "/api/v1/groups/only-a/state",
        "a-ops",
        {"state": "resolved", "resolved_in": "registry.example/parser:2"},
    )
    assert r.status_code == 200 and r.json()["status"] == {**r.json()["status"], "state": "resolved", "actor": "olga",
                                                           "resolved_in": "registry.example/parser:2"}  # fmt: skip
    r = served.post("/api/v1/groups/shared/state", "ab-ops", resolve)
    assert r.status_code == 200 and r.json()["status"]["state"] == "resolved"
    latest = r.json()["history"][0]
    assert (latest["actor"], latest["state"], latest["comment"]) == ("sam", "resolved", "fixed by #evict-fix")
    # the default list shows what needs attention; state=all shows everything
    assert [g["signature"] for g in served.get("/api/v1/groups").json()["items"]] == ["only-b"]
    every = {g["signature"]: g["state"] for g in served.get("/api/v1/groups?state=all").json()["items"]}
    assert every == {"shared": "resolved", "only-a": "resolved", "only-b": "open"}
    assert served.get("/api/v1/groups?state=bogus").status_code == 422
    r = served.post("/api/v1/groups/shared/state", "ab-ops", {"state": "ignored", "until": NOW + 86400})
    assert r.json()["status"]["state"] == "ignored" and r.json()["status"]["ignore_until"] == NOW + 86400
    bad = served.post("/api/v1/groups/shared/state", "ab-ops", {"state": "resolved", "crashes": 3})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"][-1] == "crashes"
    assert served.post("/api/v1/groups/shared/state", "ab-ops", {"state": "regressed"}).status_code == 422
    r = served.post("/api/v1/groups/shared/state", "admin", {"state": "open"})
    assert [h["state"] for h in r.json()["history"]] == ["open", "ignored", "resolved", "open", "resolved"]
    assert r.json()["history"][-1]["namespaces"] == ["a"] and r.json()["history"][0]["namespaces"] == [
        "a",
        "b",
    ]
    assert served.get("/api/v1/groups/only-b", "a").status_code == 404
    assert "secretFunctionOfB" not in served.get("/api/v1/groups?state=all", "a").text


def test_a_new_crash_regresses_a_resolved_group(served: Served) -> None:
    assert served.post("/api/v1/groups/only-b/state", "admin", {"state": "resolved"}).status_code == 200
    engine = catalog.connect(served.settings.catalog_url)
    add(engine, signature="only-b", frames=["secretFunctionOfB", "main"], namespace="b", pod="vault-b-2",
        image="registry.example/b-only:2", when=int(time.time()) + 5, signal="SIGABRT")  # fmt: skip
    engine.dispose()
    group = served.get("/api/v1/groups/only-b").json()
    assert group["status"]["state"] == "regressed" and group["history"][0]["actor"] == "corevault"
    assert "only-b" in [g["signature"] for g in served.get("/api/v1/groups").json()["items"]]
    assert [i["image"] for i in group["per_image"]] == [
        "registry.example/b-only:1",
        "registry.example/b-only:2",
    ]
    assert (
        group["first_image"] == "registry.example/b-only:1"
        and group["last_image"] == "registry.example/b-only:2"
    )


def test_search_through_the_api_and_the_cli(served: Served) -> None:
    ids = [c["id"] for c in served.get("/api/v1/crashes", params={"q": "evict"}).json()["items"]]
    assert ids == [served.ids["shared-b"], served.ids["shared-a"]]
    only_a = [c["id"] for c in served.get("/api/v1/crashes", "a", params={"q": "evict"}).json()["items"]]
    assert only_a == [served.ids["shared-a"]]
    assert served.get("/api/v1/crashes", "a", params={"q": "secretFunction"}).json()["items"] == []
    page = served.get("/api/v1/crashes", params={"q": "main", "limit": 2}).json()
    rest = served.get("/api/v1/crashes", params={"q": "main", "limit": 10, "cursor": page["next"]}).json()
    assert len(page["items"] + rest["items"]) == len({c["id"] for c in page["items"] + rest["items"]}) >= 4
    short = served.get("/api/v1/crashes", params={"q": "ma"})
    assert short.status_code == 422 and short.json()["detail"][0]["loc"] == ["query", "q"]
    remote = served.cli("a", "list", "--search", "ma")
    assert (
        remote.returncode == 2 and "q: String should match pattern" in remote.stderr
    )  # bad input, as locally
    groups = served.get("/api/v1/groups", params={"q": "parser-a", "state": "all"}).json()["items"]
    assert [g["signature"] for g in groups] == ["only-a"]
    out = served.cli("a", "list", "--search", "readHeader", "--json")
    assert (
        out.returncode == 0
        and served.ids["only-a"] in out.stdout
        and served.ids["shared-a"] not in out.stdout
    )
    local = served.cli(None, "list", "--search", "cache-b", "--json")
    assert local.returncode == 0 and served.ids["shared-b"] in local.stdout, local.stderr
    bad = served.cli(None, "list", "--search", "x")
    assert bad.returncode == 2 and "three characters" in bad.stderr and len(bad.stderr.splitlines()) == 1


def test_groups_commands_change_states_remotely_and_locally(served: Served) -> None:
    denied = served.cli("a", "groups", "resolve", "only-a")
    assert denied.returncode == 1 and "update on pods" in denied.stderr
    ok = served.cli(
        "a-ops", "groups", "resolve", "only-a", "--in", "registry.example/parser:9", "-m", "bumped"
    )
    assert ok.returncode == 0 and ok.stdout.strip() == "only-a: resolved", ok.stderr
    assert served.get("/api/v1/groups/only-a").json()["status"]["resolved_in"] == "registry.example/parser:9"
    assert served.cli("a-ops", "groups", "ignore", "only-a", "--crashes", "5").returncode == 0
    status = served.get("/api/v1/groups/only-a").json()["status"]
    assert status["state"] == "ignored" and status["ignore_until_count"] == 6
    shown = served.cli("a-ops", "groups", "show", "only-a")
    assert "State: ignored" in shown.stdout and "olga → resolved in a (" in shown.stdout
    ops = served.cli("ab-ops", "groups", "resolve", "shared", "-m", "a and b")
    assert ops.returncode == 0, ops.stderr
    assert served.cli("a-ops", "groups", "reopen", "shared").returncode == 0  # in a only
    shared = served.cli("ab-ops", "groups", "show", "shared").stdout
    assert "State: open" in shared and "in: a: open" in shared and "in: b: resolved" in shared, shared
    assert "sam → resolved in a, b (comment a and b)" in shared, shared
    listed = served.cli("a-ops", "groups", "--state", "ignored", "--json")
    assert '"only-a"' in listed.stdout
    assert "only-a" not in served.cli("a-ops", "groups").stdout  # not needing attention
    local = served.cli(None, "groups", "reopen", "only-a", "-m", "from the node")
    assert local.returncode == 0, local.stderr
    hist = served.get("/api/v1/groups/only-a").json()["history"]
    assert hist[0]["state"] == "open" and hist[0]["comment"] == "from the node" and hist[0]["actor"]
    until = served.cli(None, "groups", "ignore", "only-a", "--until", "2d")
    assert until.returncode == 0
    assert (
        abs(served.get("/api/v1/groups/only-a").json()["status"]["ignore_until"] - (time.time() + 2 * 86400))
        < 600
    )
    missing = served.cli(None, "groups", "resolve", "no-such-group")
    assert missing.returncode == 4 and "no crash group" in missing.stderr
    assert served.cli(None, "groups", "reopen", "only-a").returncode == 0


@pytest.mark.servers
def test_browser_resolves_and_reopens_from_the_group_page(served: Served, screenshots: str) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1366, "height": 900})
            page.goto(served.url + "/login")
            page.fill("input[name=token]", TOKENS["ab-ops"])
            page.click("form[action='/login'] button")
            page.wait_for_url(served.url + "/")
            page.fill("input[name=q]", "readHeader")
            page.click("form.filters button")
            page.wait_for_url("**/?*q=readHeader*")
            assert page.locator("table.groups tbody tr").count() == 1
            page.click("text=SIGSEGV in Parser::readHeader ← main")
            page.wait_for_url("**/groups/only-a")
            assert "registry.example/parser:1" in page.inner_text("#per-image")
            page.fill("#resolve-form input[name=resolved_in]", "registry.example/parser:2")
            page.fill("#resolve-form input[name=comment]", "bounds check added")
            page.click("#resolve")
            page.wait_for_url("**/groups/only-a")
            state = page.inner_text("#state")
            assert "resolved" in state and "sam" in state and "bounds check added" in state
            page.click("#reopen")
            page.wait_for_url("**/groups/only-a")
            assert (
                page.locator("#state table.history tbody tr").first.inner_text().split("\t")[2].strip()
                == "open"
            )
            page.fill("#ignore-form input[name=crashes]", "3")
            page.click("#ignore")
            page.wait_for_url("**/groups/only-a")
            assert "until it reaches" in page.inner_text("#state") and page.locator("#reopen").count() == 1
            assert _state(served, "only-a") == "ignored"
            page.click("#reopen")
            page.wait_for_url("**/groups/only-a")
            page.goto(served.url + "/groups/shared")
            compare = page.inner_text("#compare")
            assert "cache-a-1" in compare and "cache-b-9" in compare
            assert page.locator("#compare tr.differs").count() >= 3  # time, pod, node, image
            assert page.locator("#compare tr.same").count() >= 2  # executable, signal, other threads
            page.screenshot(path=os.path.join(screenshots, "group-page.png"), full_page=True)

            reader = browser.new_page()  # a reader of a without update: no buttons, and a forged post fails
            reader.goto(served.url + "/login")
            reader.fill("input[name=token]", TOKENS["a"])
            reader.click("form[action='/login'] button")
            reader.wait_for_url(served.url + "/")
            reader.goto(served.url + "/groups/only-a")
            assert reader.locator("#resolve").count() == 0 and "needs update on pods" in reader.inner_text(
                "#state"
            )
            cookies = {c["name"]: c["value"] for c in reader.context.cookies()}
        finally:
            browser.close()
    forged = httpx.post(
        served.url + "/groups/only-a/state",
        cookies=cookies,
        data={"state": "resolved", "form_token": "0" * 64},
    )
    assert forged.status_code == 403 and "stale" in forged.text
    assert _state(served, "only-a") == "open"


def test_kubernetes_readers_change_the_state_where_they_may_update_pods(served: Served, tmp_path) -> None:
    from corevault.kube import cluster
    from corevault.server.access import KubeAccess
    from testbed.fakekube import FakeKube

    fake = FakeKube().start()
    try:
        fake.users = {"dev-token": ("dev", ["devs"]), "lead-token": ("lead", ["leads"])}
        fake.grants = {("devs", "get", "pods", "*"), ("devs", "update", "pods", "a"),
                       ("leads", "get", "pods", "*"), ("leads", "update", "pods", "a"), ("leads", "update", "pods", "b")}  # fmt: skip
        api = cluster.api_client(fake.kubeconfig(str(tmp_path / "kubeconfig")))
        with servers.asgi(create_app(served.settings, KubeAccess(api))) as url:

            def post(token: str, sig: str) -> httpx.Response:
                return httpx.post(f"{url}/api/v1/groups/{sig}/state", headers={"Authorization": f"Bearer {token}"},
                                  json={"state": "ignored", "comment": "kube"})  # fmt: skip

            dev = post("dev-token", "shared")  # it crashed in b too: ignored in a only
            assert dev.status_code == 200 and dev.json()["changes_in"] == ["a"]
            assert [s["state"] for s in dev.json()["status"]["namespaces"]] == ["ignored", "open"]
            assert post("dev-token", "only-a").status_code == 200
            assert post("lead-token", "shared").status_code == 200
            detail = httpx.get(
                f"{url}/api/v1/groups/shared", headers={"Authorization": "Bearer lead-token"}
            ).json()
            assert detail["history"][0]["actor"] == "lead" and detail["may_change"] is True
            assert detail["changes_in"] == ["a", "b"] and detail["status"]["state"] == "ignored"
    finally:
        fake.stop()
    asked = {(r.body["spec"]["user"], r.body["spec"]["resourceAttributes"].get("namespace"), r.body["spec"]["resourceAttributes"]["verb"])
             for r in fake.requests if r.path.endswith("subjectaccessreviews")}  # type: ignore[index]  # fmt: skip
    assert {("dev", "a", "update"), ("dev", "b", "update"), ("lead", "b", "update")} <= asked
    for sig in ("shared", "only-a"):
        served.post(f"/api/v1/groups/{sig}/state", "admin", {"state": "open"})


def test_group_metrics_are_for_readers_and_made_of_their_namespaces(served: Served) -> None:
    assert httpx.get(served.url + "/api/v1/metrics").status_code == 401
    mine = served.get("/api/v1/metrics", "a").text
    assert 'corevault_groups{namespace="a",state=' in mine and 'namespace="b"' not in mine
    assert 'corevault_group_events_total{kind="new",namespace="a"} 2.0' in mine
    assert "corevault_alert_deliveries" not in mine  # sinks are the cluster's business
    everything = served.get("/api/v1/metrics").text
    assert 'corevault_group_events_total{kind="new",namespace="b"}' in everything
    assert served.get("/api/v1/metrics", "a", params={"namespace": "b"}).status_code == 403


def test_a_refused_state_form_says_which_field_and_why(served: Served) -> None:
    import re

    with httpx.Client(base_url=served.url) as client:
        client.post("/login", data={"token": TOKENS["admin"]})
        page = client.get("/groups/only-a").text
        [form_token] = set(re.findall(r'name="form_token" value="([0-9a-f]+)"', page))
        form = {"state": "ignored", "crashes": "0", "form_token": form_token}
        r = client.post("/groups/only-a/state", data=form)
    assert r.status_code == 400, r.text
    assert "cannot change the state as asked: crashes: Input should be greater than or equal to 1" in r.text
    assert "tagged-union" not in r.text
    assert _state(served, "only-a") == "open"
