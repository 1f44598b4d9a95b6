"""Shipping to S3 through an egress proxy: both clients of the store (obstore for a single
PutObject, botocore for the rest) take the same way, the one the environment or ``[vault.s3]
proxy`` names.

Real parts: the checked-in spool entries shipped by the agent to SeaweedFS through tinyproxy
(testbed/egress.py), with an HTTP proxy in front of SeaweedFS that lists what reaches the store
(testbed/tamper.py). Every request the store received must be one the egress proxy passed, or
none of them when ``NO_PROXY`` names the endpoint.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

from corevault import config, spool
from corevault.agent.loop import Agent
from corevault.config import S3Settings
from corevault.vault import blobs, s3proxy, s3put, stores
from testbed import egress, relay, servers, tamper, tls
from tests.conftest import FIXTURE_SPOOL
from tests.nodes import Node, make_node
from tests.test_store_answers import operation
from tests.test_stores import PART, weed  # noqa: F401 - the module's SeaweedFS
from tests.test_vault import big_entry

pytestmark = pytest.mark.servers
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")


@pytest.fixture
def store_side(weed) -> Iterator[tamper.Tamper]:  # noqa: F811
    """What reaches SeaweedFS, listed: the store's endpoint is this proxy's address."""
    with tamper.tamper(weed.s3_port) as t:
        yield t


@pytest.fixture
def proxy() -> Iterator[egress.Egress]:
    with egress.egress() as e:
        yield e


@pytest.fixture(autouse=True)
def no_proxy_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only what a test sets: none of the machine's proxy variables, in either case."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


def shipping_node(weed: Any, endpoint: str, *, big: bool, extra: str = "") -> Node:  # noqa: F811
    """A node with the fixture's two crashes (and one whose core goes up in parts), its vault's
    blobs in SeaweedFS at ``endpoint``."""
    entries = sorted(os.listdir(spool.ready_dir(FIXTURE_SPOOL)))
    vault = (
        f'[vault]\nstore = "s3://{weed.bucket}/proxied-{os.urandom(4).hex()}"\n'
        f'[vault.s3]\nendpoint = "{endpoint}"\naddressing = "path"\npart_size = "5M"\n{extra}'
    )
    node = make_node({"dir": FIXTURE_SPOOL, "ids": entries}, vault, "analyze = false\n")
    if big:
        big_entry(node, 12)  # 12 MiB of incompressible bytes: three parts
    return node


def ship(node: Node) -> None:
    """One pass of the agent; everything shipped, nothing left in the spool."""
    assert Agent(node.settings).run(once=True) == 0
    assert spool.entries(node.spool) == []


def store_requests(side: tamper.Tamper) -> list[tuple[str, str]]:
    """What reached the store, as the egress proxy lists a forwarded request (sorted: uploads
    go up in parallel)."""
    return sorted((r.method, f"http://127.0.0.1:{side.port}{r.path}") for r in side.requests)


def by_client(side: tamper.Tamper) -> dict[str, set[str]]:
    """The operations each client sent: obstore's PutObjects carry a SHA-256 of the body."""
    clients: dict[str, set[str]] = {"obstore": set(), "botocore": set()}
    for r in side.requests:
        sent = {k.lower() for k in r.headers}
        clients["obstore" if "x-amz-checksum-sha256" in sent else "botocore"].add(operation(r))
    return clients


@pytest.mark.parametrize("variable", ["HTTP_PROXY", "http_proxy"])
def test_every_request_of_a_shipping_run_goes_through_the_proxy_the_environment_names(
    weed,  # noqa: F811
    store_side,
    proxy,
    monkeypatch,
    variable: str,
) -> None:
    monkeypatch.setenv(variable, proxy.url)
    node = shipping_node(weed, store_side.endpoint, big=True)
    ship(node)
    assert len(node.crashes()) == 3
    clients = by_client(store_side)
    assert clients["obstore"] == {"PutObject"}  # the small blobs
    assert {"CreateMultipartUpload", "UploadPart", "CompleteMultipartUpload", "HeadObject"} <= clients[
        "botocore"
    ]
    assert sorted(proxy.requests()) == store_requests(store_side)  # each through the proxy, none around it


@pytest.mark.parametrize(
    "no_proxy",
    ["127.0.0.1", "127.0.0.1:{port}", "*", ".0.0.1", "localhost,127.0.0.0/8", "10.0.0.0/8, 127.0.0.1/32"],
)
def test_no_request_goes_through_the_proxy_when_no_proxy_names_the_endpoint(
    weed,  # noqa: F811
    store_side,
    proxy,
    monkeypatch,
    no_proxy: str,
) -> None:
    """Left to themselves, botocore honoured some of these forms and obstore others: each would
    have sent part of the run through the proxy."""
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    monkeypatch.setenv("NO_PROXY", no_proxy.format(port=store_side.port))
    node = shipping_node(weed, store_side.endpoint, big=False)
    ship(node)
    assert by_client(store_side)["obstore"] == {"PutObject"} and by_client(store_side)["botocore"]
    assert proxy.requests() == []


@pytest.mark.parametrize(
    "case",
    [
        ({"ALL_PROXY": "{proxy}"}, False),  # neither honours it: botocore never did
        ({"HTTPS_PROXY": "{proxy}"}, False),  # the endpoint is http://
        ({"http_proxy": "{proxy}", "HTTP_PROXY": "http://127.0.0.1:9"}, True),  # lower case first
        ({"NO_PROXY": "127.0.0.2,example.com", "HTTP_PROXY": "{proxy}"}, True),
    ],
    ids=["ALL_PROXY", "HTTPS_PROXY-of-another-scheme", "lower-case-first", "NO_PROXY-of-other-hosts"],
)
def test_both_clients_read_the_variables_by_one_rule(
    weed,  # noqa: F811
    store_side,
    proxy,
    monkeypatch,
    case: tuple[dict[str, str], bool],
) -> None:
    env, through = case
    for name, value in env.items():
        monkeypatch.setenv(name, value.format(proxy=proxy.url))
    node = shipping_node(weed, store_side.endpoint, big=False)
    ship(node)
    assert by_client(store_side)["obstore"] == {"PutObject"} and by_client(store_side)["botocore"]
    assert sorted(proxy.requests()) == (store_requests(store_side) if through else [])


def test_the_setting_names_the_proxy_or_none_whatever_the_environment(
    weed,  # noqa: F811
    store_side,
    proxy,
    monkeypatch,
) -> None:
    node = shipping_node(weed, store_side.endpoint, big=False, extra=f'proxy = "{proxy.url}"\n')
    ship(node)
    assert sorted(proxy.requests()) == store_requests(store_side) != []

    store_side.requests.clear()
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    before = len(proxy.requests())
    node = shipping_node(weed, store_side.endpoint, big=False, extra='proxy = "none"\n')
    ship(node)
    assert store_side.requests and proxy.requests()[before:] == []


def test_the_setting_is_a_url_or_none(tmp_path) -> None:
    for bad in ("proxy.internal:3128", "socks5://proxy:1080", ""):
        with pytest.raises(config.ConfigError, match=r"\[vault.s3\] proxy"):
            config.from_dict({"vault": {"s3": {"proxy": bad}}})
    assert config.from_dict({"vault": {"s3": {"proxy": "none"}}}).s3.proxy == "none"


def open_s3(weed: Any, endpoint: str, proxy: str | None = None) -> blobs.S3Store:  # noqa: F811
    s3 = S3Settings()
    s3.endpoint, s3.addressing, s3.part_size, s3.proxy = endpoint, "path", PART, proxy
    store = stores.open_store(f"s3://{weed.bucket}/refused-{os.urandom(4).hex()}", s3)
    assert isinstance(store, blobs.S3Store)
    return store


def upload_errors(store: blobs.S3Store, tmp_path) -> list[str]:
    """The errors of a small upload (obstore), a large one (botocore) and a HEAD (botocore)."""
    big = tmp_path / "big"
    big.write_bytes(os.urandom(PART + 1))
    errors = []
    for attempt in (
        lambda: store.put_bytes("crashes/x/meta.json", b"{}"),
        lambda: store.put_file("crashes/x/core.zst", str(big)),
        lambda: store.size("crashes/x/core.zst"),
    ):
        with pytest.raises(blobs.StoreError) as e:
            attempt()
        errors.append(str(e.value))
    return errors


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_a_proxy_that_refuses_the_store_is_one_line_that_says_what_to_do(
    weed,  # noqa: F811
    tmp_path,
    monkeypatch,
    scheme: str,
) -> None:
    """Forwarded (http://) or tunnelled (https://, the proxy refuses the CONNECT) alike."""
    cert, key = tls.self_signed(str(tmp_path))
    monkeypatch.setenv("AWS_CA_BUNDLE", cert)
    with egress.egress(refuse=True) as refusing, tamper.tamper(weed.s3_port, tls=(cert, key)) as side:
        store = open_s3(weed, side.endpoint if scheme == "https" else weed.endpoint, refusing.url)
        errors = upload_errors(store, tmp_path)
        assert len(refusing.requests()) >= 3 and side.connections == []
    for error in errors:
        assert "\n" not in error
        assert f"the proxy {refusing.url}" in error
        assert "allow 127.0.0.1 on it, or name 127.0.0.1 in NO_PROXY" in error


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_a_proxy_that_wants_credentials_takes_them_from_its_url(
    weed,  # noqa: F811
    tmp_path,
    monkeypatch,
    scheme: str,
) -> None:
    cert, key = tls.self_signed(str(tmp_path))
    monkeypatch.setenv("AWS_CA_BUNDLE", cert)
    with (
        egress.egress(credentials=("corevault", "proxy-secret")) as guarded,
        tamper.tamper(weed.s3_port, tls=(cert, key)) as side,
    ):
        endpoint = side.endpoint if scheme == "https" else weed.endpoint
        errors = upload_errors(open_s3(weed, endpoint, guarded.url), tmp_path)
        assert any("asks for credentials (HTTP 407)" in e for e in errors)
        for error in errors:
            assert "\n" not in error and f"the proxy {guarded.url}" in error
        store = open_s3(weed, endpoint, guarded.url_with_credentials)
        assert store.put_bytes("crashes/y/meta.json", b"{}").size == 2  # obstore
        big = tmp_path / "big"
        big.write_bytes(os.urandom(PART + 1))
        assert store.put_file("crashes/y/core.zst", str(big)).size == PART + 1  # botocore
        with egress.egress(refuse=True) as refusing:  # the password never shows in an error
            url = refusing.url.replace("//", "//corevault:proxy-secret@")
            assert all("proxy-secret" not in e for e in upload_errors(open_s3(weed, endpoint, url), tmp_path))


def test_a_proxy_that_is_away_is_named(weed, tmp_path) -> None:  # noqa: F811
    away = f"http://127.0.0.1:{servers.free_port()}"
    for error in upload_errors(open_s3(weed, weed.endpoint, away), tmp_path):
        assert "\n" not in error and f"cannot go through the proxy {away} to 127.0.0.1" in error


def test_a_failing_store_gets_as_many_attempts_from_both_clients(proxy, monkeypatch) -> None:
    """Behind the proxy, nothing listens where the store should be: the proxy answers each attempt
    with an error the clients retry. obstore made three attempts where botocore made four."""
    s3 = S3Settings()
    s3.endpoint, s3.addressing = f"http://127.0.0.1:{servers.free_port()}", "path"
    s3.proxy = proxy.url
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", servers.KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", servers.SECRET)
    store = stores.open_store("s3://bucket/p", s3)
    assert isinstance(store, blobs.S3Store)
    attempts = store.client.meta.config.retries["total_max_attempts"]
    with pytest.raises(blobs.StoreError) as put:
        store.put_bytes("crashes/z/meta.json", b"{}")  # obstore
    obstore_attempts = len(proxy.requests())
    with pytest.raises(blobs.StoreError) as head:
        store.size("crashes/z/meta.json")  # botocore
    assert obstore_attempts == len(proxy.requests()) - obstore_attempts == attempts == 4
    # botocore reads the proxy's answer, 500; obstore sees the proxy close the connection first
    assert f"the proxy {proxy.url} could not reach 127.0.0.1 (HTTP 500): check that the store runs" in str(
        head.value
    )
    assert f"cannot go through the proxy {proxy.url} to 127.0.0.1" in str(put.value)


def test_obstore_has_botocores_timeouts() -> None:
    from botocore.config import Config

    config = Config(connect_timeout=2.5, read_timeout=30)
    assert s3put.client_options(config) == {
        "connect_timeout": "2500ms",
        "read_timeout": "30000ms",
        "timeout": s3put.REQUEST_TIMEOUT,
    }


@pytest.mark.parametrize(
    ("netloc", "no_proxy", "bypassed"),
    [
        ("s3.internal:9000", "s3.internal", True),
        ("bucket.s3.internal", ".internal", True),
        ("s3.internal:9000", "s3.internal:9001", False),
        ("10.1.2.3:9000", "10.0.0.0/8", True),
        ("[fd00::5]:9000", "fd00::/8", True),
        ("s3.internal", "internal.example", False),
        ("s3.internal", "", False),
    ],
)
def test_no_proxy_forms(netloc: str, no_proxy: str, bypassed: bool) -> None:
    assert s3proxy.bypassed(netloc, no_proxy) is bypassed


def test_an_https_store_is_reached_through_the_proxys_tunnels_alone(
    weed,  # noqa: F811
    proxy,
    monkeypatch,
    tmp_path,
) -> None:
    """An https:// endpoint: each client opens CONNECT tunnels through the proxy (TLS inside, the
    store's certificate checked against AWS_CA_BUNDLE), and every connection the store took is one
    of those tunnels."""
    cert, key = tls.self_signed(str(tmp_path))
    monkeypatch.setenv("AWS_CA_BUNDLE", cert)
    with tamper.tamper(weed.s3_port, tls=(cert, key)) as side:
        monkeypatch.setenv("HTTPS_PROXY", proxy.url)
        monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # for http:// endpoints only: unused
        ship(shipping_node(weed, side.endpoint, big=True))
        clients = by_client(side)
        assert clients["obstore"] == {"PutObject"} and "UploadPart" in clients["botocore"]
        tunnels = proxy.requests()
        assert set(tunnels) == {("CONNECT", f"127.0.0.1:{side.port}")}
        assert len(tunnels) == len(side.connections)


@pytest.mark.parametrize(
    ("region", "host"),
    [("us-east-1", "s3.amazonaws.com"), ("eu-west-1", "s3.eu-west-1.amazonaws.com"),
     ("cn-north-1", "s3.cn-north-1.amazonaws.com.cn")],
)  # fmt: skip
def test_no_proxy_is_matched_against_the_endpoint_botocore_resolves(
    monkeypatch: pytest.MonkeyPatch, region: str, host: str
) -> None:
    """No endpoint configured (AWS): the host NO_PROXY must name is the one botocore makes the
    region's requests to; nothing is sent to know it."""
    monkeypatch.setenv("HTTPS_PROXY", "http://egress.invalid:3128")
    s3 = S3Settings()
    s3.region = region
    through = stores.open_store("s3://bucket/p", s3)
    assert isinstance(through, blobs.S3Store)
    assert through.proxy == "http://egress.invalid:3128"
    assert through.client.meta.config.proxies == {"http": through.proxy, "https": through.proxy}
    monkeypatch.setenv("NO_PROXY", host)
    direct = stores.open_store("s3://bucket/p", s3)
    assert isinstance(direct, blobs.S3Store)
    assert (direct.proxy, direct.client.meta.config.proxies, direct.endpoint) == (None, {}, f"https://{host}")


def test_an_https_proxy_is_trusted_only_with_its_certificate(weed, proxy, monkeypatch, tmp_path) -> None:  # noqa: F811
    """The proxy over TLS (tinyproxy behind a TLS relay): both clients check its certificate
    against the store's CA bundle. botocore, told nothing, spoke TLS to any proxy unchecked."""
    cert, key = tls.self_signed(str(tmp_path))
    with relay.relay(proxy.port, tls=(cert, key)) as over_tls:
        errors = upload_errors(open_s3(weed, weed.endpoint, over_tls.endpoint), tmp_path)
        assert proxy.requests() == []  # nothing passed through a proxy not trusted
        for error in errors:
            assert "\n" not in error and f"the proxy {over_tls.endpoint}" in error
        monkeypatch.setenv("AWS_CA_BUNDLE", cert)
        store = open_s3(weed, weed.endpoint, over_tls.endpoint)
        assert store.put_bytes("crashes/t/meta.json", b"{}").size == 2  # obstore
        assert store.size("crashes/t/meta.json") == 2  # botocore
        assert [method for method, _ in proxy.requests()] == ["PUT", "HEAD"]
