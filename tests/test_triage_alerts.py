"""Alerts reach people: signed webhooks and Slack messages through an outage and a restart, once per
group and window; and the Prometheus path, with a real Prometheus scraping corevault and a real
Alertmanager delivering to a local receiver.

Crashes are recorded through the catalog's own functions (:mod:`tests.triage_data`); the
receivers are real HTTP servers on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
import sqlalchemy as sa
import yaml

from corevault import config
from corevault.alerts import outbox, payload, sinks
from corevault.server.access import StaticTokens
from corevault.server.app import create_app
from corevault.vault import catalog, lifecycle
from testbed import servers
from tests.conftest import starts_servers
from tests.triage_data import add
from tests.waiting import wait_for

CLI = os.path.join(os.path.dirname(sys.executable), "corevault")
ROOT = os.path.join(os.path.dirname(__file__), "..")
RULES = os.path.join(ROOT, "deploy", "monitoring", "corevault-rules.yaml")
SECRET = "shop-webhook-secret-0123456789"
ADMIN = "admin-token-0123456789"


@dataclass
class Receiver:
    """A webhook receiver on 127.0.0.1 that keeps every request it gets."""

    port: int
    got: list[tuple[str, dict, bytes]] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Receiver:
        got = self.got

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers["Content-Length"]))
                got.append((self.path, dict(self.headers), raw))
                self.send_response(200)
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    def bodies(self, path: str) -> list[dict]:
        return [json.loads(raw) for p, _, raw in self.got if p == path]

    def __enter__(self) -> Receiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver(servers.free_port())
    yield r
    r.stop()


def _alerts_toml(receiver: Receiver, window: float = 3600, extra: str = "") -> str:
    return (
        f'[alerts]\nurl = "https://corevault.example"\nwindow = {window}\nspike_crashes = 3\nspike_minutes = 10\n'
        f"retry_first = 0.3\nretry_max = 1\npoll = 0.2\n{extra}"
        f'[[alerts.sink]]\nname = "shop-hook"\nkind = "webhook"\nurl = "{receiver.url}/hook"\nnamespaces = ["shop"]\n'
        f'secret = "{SECRET}"\n'
        f'[[alerts.sink]]\nname = "all-slack"\nkind = "slack"\nurl = "{receiver.url}/slack"\nnamespaces = ["*"]\n'
    )


def _settings(tmp_path, receiver: Receiver, **kw: object) -> tuple[config.Settings, str]:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'state_dir = "{tmp_path}/state"\n' + _alerts_toml(receiver, **kw))  # type: ignore[arg-type]
    return config.load(str(cfg)), str(cfg)


def test_each_sink_hears_once_per_group_and_window_with_its_namespace_only(
    tmp_path, receiver: Receiver
) -> None:
    settings, _ = _settings(tmp_path, receiver, window=1.5)
    cfg = sinks.parse(settings.alerts)
    assert cfg is not None
    engine = catalog.connect(settings.catalog_url)
    now = int(time.time())
    add(
        engine,
        signature="g-shop",
        frames=["Cart::total", "main"],
        namespace="shop",
        image="reg/shop:2",
        when=now - 60,
    )
    add(engine, signature="g-team", frames=["<!channel> <https://evil|click>", "main"], namespace="team",
        image="reg/team-secret:1", when=now - 60)  # fmt: skip
    receiver.start()
    with httpx.Client(timeout=10) as client:
        assert outbox.run_once(engine, cfg, client) == 3
        hooks = receiver.bodies("/hook")
        assert [(h["event"], h["namespace"], h["group"]["signature"]) for h in hooks] == [
            ("new", "shop", "g-shop")
        ]
        assert "team" not in json.dumps(hooks)  # the shop sink carries nothing of team
        _, headers, raw = next(g for g in receiver.got if g[0] == "/hook")
        assert payload.verify(
            SECRET.encode(), headers["X-Corevault-Timestamp"], raw, headers["X-Corevault-Signature"]
        )
        assert not payload.verify(b"another-secret-0123456789", headers["X-Corevault-Timestamp"], raw,
                                  headers["X-Corevault-Signature"])  # fmt: skip
        assert (
            hooks[0]["count"] == 1 and hooks[0]["group"]["url"] == "https://corevault.example/groups/g-shop"
        )
        slack = {m["text"].split(" in ")[-1]: m for m in receiver.bodies("/slack")}
        assert set(slack) == {"shop", "team"}
        team = json.dumps(slack["team"])
        assert "&lt;!channel&gt;" in team and "<!channel>" not in team and "<https://evil" not in team

        # the same group crashes in team, saying something of its own: new to team, nothing for shop
        add(engine, signature="g-shop", frames=["Cart::total", "teamOnlySecret"], namespace="team",
            image="reg/team-secret:1", when=now - 30)  # fmt: skip
        # a storm in the same window: a spike, but the window has had its alert
        for _ in range(4):
            add(engine, signature="g-shop", frames=["Cart::total", "main"], namespace="shop", image="reg/shop:2",
                when=int(time.time()) - 5)  # fmt: skip
        assert outbox.run_once(engine, cfg, client) == 0
        time.sleep(1.6)  # the next window: a regression is told
        with engine.begin() as conn:
            lifecycle.change(conn, "g-shop", lifecycle.Change("resolved"), "alice")
        add(engine, signature="g-shop", frames=["Cart::total", "main"], namespace="shop", image="reg/shop:3",
            when=int(time.time()) + 1)  # fmt: skip
        assert outbox.run_once(engine, cfg, client) == 2
        hooks = receiver.bodies("/hook")
        assert [h["event"] for h in hooks] == ["new", "regressed"] and hooks[1]["group"][
            "state"
        ] == "regressed"
        assert hooks[1]["image"] == "reg/shop:3" and hooks[1]["count"] == 6
        time.sleep(1.6)
        for _ in range(4):  # a spike in a window of its own
            add(engine, signature="g-team", frames=["<!channel> <https://evil|click>", "main"], namespace="team",
                image="reg/team-secret:1", when=int(time.time()) - 5)  # fmt: skip
        assert outbox.run_once(engine, cfg, client) == 1
        spike = receiver.bodies("/slack")[-1]
        assert spike["text"].startswith("Crash spike") and "5 in the spike window" in json.dumps(spike)
        assert len(receiver.bodies("/hook")) == 2  # team's spike is not shop's business
    with engine.connect() as conn:
        counts = {(s, st): n for s, st, n in outbox.status_counts(conn)}
    assert counts[("shop-hook", "sent")] == 2 and counts[("shop-hook", "suppressed")] >= 1
    assert counts[("all-slack", "sent")] == 4


def _serve(cfg: str, tokens: str, port: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        [CLI, "-c", cfg, "serve", "--listen", f"127.0.0.1:{port}", "--tokens", tokens],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    servers.wait_port(port)
    return proc


def _tokens(tmp_path) -> str:
    tokens = tmp_path / "tokens.toml"
    tokens.write_text(f'[[token]]\nname = "root"\ntoken = "{ADMIN}"\nnamespaces = ["*"]\nupdate = true\n')
    tokens.chmod(0o600)
    return str(tokens)


@pytest.mark.servers
def test_an_alert_survives_a_receiver_outage_and_a_server_restart_and_arrives_once(
    tmp_path, receiver: Receiver
) -> None:
    settings, cfg = _settings(tmp_path, receiver)
    tokens = _tokens(tmp_path)
    engine = catalog.connect(settings.catalog_url)
    port = servers.free_port()
    server = _serve(cfg, tokens, port)
    try:
        add(
            engine,
            signature="g1",
            frames=["Db::connect", "main"],
            namespace="shop",
            when=int(time.time()) - 30,
        )
        d = lifecycle.alert_deliveries.c

        def attempts() -> list[tuple[str, int, str]]:
            with engine.connect() as conn:
                return [
                    tuple(r) for r in conn.execute(sa.select(d.sink, d.attempts, d.status).order_by(d.sink))
                ]

        wait_for(
            lambda: all(a >= 2 for _, a, _ in attempts()) and len(attempts()) == 2,
            "retries while the receiver is down",
            every=0.2,
        )
        assert {s for _, _, s in attempts()} == {"pending"}
        server.send_signal(signal.SIGKILL)  # no goodbye: the outbox is all that remains
        server.wait(30)
        receiver.start()
        server = _serve(cfg, tokens, port)
        wait_for(lambda: {s for _, _, s in attempts()} == {"sent"}, "both deliveries", every=0.2)
        add(
            engine,
            signature="g1",
            frames=["Db::connect", "main"],
            namespace="shop",
            when=int(time.time()) - 10,
        )
        time.sleep(1.5)  # rounds enough to send anything more
        assert [h["event"] for h in receiver.bodies("/hook")] == ["new"]
        assert len(receiver.bodies("/slack")) == 1
    finally:
        server.terminate()
        server.wait(30)


def test_bad_alert_settings_are_one_line_errors(tmp_path, receiver: Receiver) -> None:
    for extra, words in (
        ('[[alerts.sink]]\nname = "x"\nkind = "webhook"\nurl = "http://127.0.0.1:9/"\nnamespaces = ["a"]\n',
         "needs secret_file"),
        ('[[alerts.sink]]\nname = "x"\nkind = "pager"\nurl = "http://127.0.0.1:9/"\nnamespaces = ["a"]\n',
         "kind is webhook or slack"),
    ):  # fmt: skip
        cfg = tmp_path / "bad.toml"
        cfg.write_text(f'state_dir = "{tmp_path}/state"\n[alerts]\n{extra}')
        out = subprocess.run([CLI, "-c", str(cfg), "serve", "--tokens", _tokens(tmp_path)],
                             capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
        assert out.returncode == 2 and words in out.stderr and len(out.stderr.strip().splitlines()) == 1, (
            out.stderr
        )


def test_the_rules_pass_promtool_in_both_forms() -> None:
    with open(RULES) as f:
        plain = yaml.safe_load(f)
    with open(os.path.join(ROOT, "deploy", "monitoring", "prometheusrule.yaml")) as f:
        operator = yaml.safe_load(f)
    assert operator["kind"] == "PrometheusRule" and operator["spec"] == plain
    out = subprocess.run(["promtool", "check", "rules", RULES], capture_output=True, text=True, check=False)
    assert out.returncode == 0 and "SUCCESS: 4 rules found" in out.stdout, out.stdout + out.stderr


@dataclass
class Monitoring:
    prometheus: subprocess.Popen
    alertmanager: subprocess.Popen
    prom_url: str


@pytest.fixture
@starts_servers
def monitoring(tmp_path, receiver: Receiver) -> Iterator[Callable[[str], Monitoring]]:
    started: list[subprocess.Popen] = []

    def start(target: str) -> Monitoring:
        am_port, prom_port = servers.free_port(), servers.free_port()
        (tmp_path / "am.yml").write_text(yaml.safe_dump({
            "route": {"receiver": "hook", "group_by": ["alertname", "namespace"], "group_wait": "1s",
                      "group_interval": "1s", "repeat_interval": "1h"},
            "receivers": [{"name": "hook", "webhook_configs": [{"url": f"{receiver.url}/alertmanager"}]}],
        }))  # fmt: skip
        am = subprocess.Popen(
            ["prometheus-alertmanager", f"--config.file={tmp_path}/am.yml", f"--storage.path={tmp_path}/am",
             f"--web.listen-address=127.0.0.1:{am_port}", "--cluster.listen-address="],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        started.append(am)
        (tmp_path / "token").write_text(ADMIN)
        (tmp_path / "prom.yml").write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [os.path.abspath(RULES)],
            "alerting": {"alertmanagers": [{"static_configs": [{"targets": [f"127.0.0.1:{am_port}"]}]}]},
            "scrape_configs": [{"job_name": "corevault", "metrics_path": "/api/v1/metrics",
                                "authorization": {"credentials_file": str(tmp_path / "token")},
                                "static_configs": [{"targets": [target]}]}],
        }))  # fmt: skip
        prom = subprocess.Popen(
            ["prometheus", f"--config.file={tmp_path}/prom.yml", f"--storage.tsdb.path={tmp_path}/tsdb",
             f"--web.listen-address=127.0.0.1:{prom_port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        started.append(prom)
        servers.wait_port(am_port)
        servers.wait_port(prom_port)
        return Monitoring(prom, am, f"http://127.0.0.1:{prom_port}")

    yield start
    for p in started:
        p.terminate()
        p.wait(30)


def test_prometheus_scrapes_corevault_and_alertmanager_delivers(
    tmp_path, receiver: Receiver, monitoring: Callable[[str], Monitoring]
) -> None:
    settings = config.from_dict({"state_dir": str(tmp_path / "state")})
    engine = catalog.connect(settings.catalog_url)
    add(engine, signature="old", frames=["Old::bug", "main"], namespace="shop", when=int(time.time()) - 3600)
    receiver.start()
    with servers.asgi(create_app(settings, StaticTokens(_tokens(tmp_path)))) as url:
        mon = monitoring(url.removeprefix("http://"))

        def scraped() -> bool:
            r = httpx.get(
                mon.prom_url + "/api/v1/query", params={"query": 'corevault_groups{namespace="shop"}'}
            )
            return r.status_code == 200 and bool(r.json()["data"]["result"])

        wait_for(scraped, "Prometheus to scrape corevault", every=0.2)
        time.sleep(2)  # a few samples of the old state: the new group must be an increase
        add(engine, signature="fresh", frames=["New::bug", "main"], namespace="shop", when=int(time.time()))
        with engine.begin() as conn:
            lifecycle.change(conn, "old", lifecycle.Change("resolved"), "alice")
        add(engine, signature="old", frames=["Old::bug", "main"], namespace="shop", when=int(time.time()) + 1)

        def alerted(name: str) -> Callable[[], list[dict]]:
            return lambda: [a for b in receiver.bodies("/alertmanager") for a in b["alerts"]
                            if a["labels"]["alertname"] == name and a["status"] == "firing"]  # fmt: skip

        new = wait_for(alerted("CorevaultNewCrashGroup"), "the new-group alert", timeout=90, every=0.2)
        regressed = wait_for(
            alerted("CorevaultRegressedCrashGroups"), "the regression alert", timeout=90, every=0.2
        )
    assert new[0]["labels"]["namespace"] == "shop" and new[0]["labels"]["severity"] == "warning"  # type: ignore[index]
    assert regressed[0]["labels"]["namespace"] == "shop"  # type: ignore[index]
    assert "New crash group in namespace shop" in new[0]["annotations"]["summary"]  # type: ignore[index]
