"""Every store, and the server's check of where downloads are redirected, take one proxy decision.

:mod:`corevault.vault.s3proxy` decides the proxy of the S3 store's requests once, by the standard
library's rules. The GCS and Azure stores went through requests, and the server's check of the
redirect address through httpx, each reading the proxy variables by rules of its own: requests
and httpx honour ``ALL_PROXY`` (which botocore and urllib do not), httpx takes
``NO_PROXY=127.0.0.0/8`` for a host's name, and the check ignored ``[vault.s3] proxy``.

Real parts: fake-gcs-server and Azurite as the stores, SeaweedFS behind a listing proxy as the
redirect address, tinyproxy as the egress proxy (testbed/egress.py), which lists what it passed.
"""

from __future__ import annotations

import os
import uuid

import pytest

from corevault import config
from corevault.server import redirects
from corevault.vault.crashes import LocalVault
from testbed import clouds
from tests.test_s3proxy import no_proxy_variables, proxy, store_side  # noqa: F401 - the fixtures
from tests.test_stores import PART, azurite, open_cloud, weed  # noqa: F401 - the fixtures

pytestmark = pytest.mark.servers


@pytest.mark.parametrize("kind", ["gcs", "azure"])
@pytest.mark.parametrize(
    ("env", "through"),
    [({"ALL_PROXY": "{proxy}"}, False), ({"HTTP_PROXY": "{proxy}"}, True)],
    ids=["ALL_PROXY-honoured-by-no-store", "HTTP_PROXY"],
)
def test_the_cloud_stores_go_through_the_proxy_the_s3_store_would(  # noqa: PLR0917
    kind: str,
    env: dict[str, str],
    through: bool,
    proxy,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
    tmp_path,
) -> None:
    name = f"cv-{uuid.uuid4().hex[:12]}"
    server: clouds.Emulator
    if kind == "gcs":
        server = request.getfixturevalue("gcs")
        server.create_bucket(name)
        url = f"gs://{name}/vault"
    else:
        server = request.getfixturevalue("azurite")
        server.create_container(name)
        url = f"az://{name}/vault"
    for variable, value in env.items():
        monkeypatch.setenv(variable, value.format(proxy=proxy.url))
    store = open_cloud(url, server)
    try:
        if kind == "gcs":  # in parts: the resumable requests made here, apart from the library's
            big = tmp_path / "core.zst"
            big.write_bytes(os.urandom(PART + 1))
            assert store.put_file("crashes/c/core.zst", str(big)).size == PART + 1
        assert store.put_bytes("crashes/c/meta.json", b"{}").size == 2
        assert store.size("crashes/c/meta.json") == 2
    finally:
        store.close()
    passed = proxy.requests()
    if through:
        assert {"PUT", "GET"} & {method for method, _ in passed}, passed
        assert all(f"127.0.0.1:{server.port}" in target for _, target in passed), passed
    else:
        assert passed == []


def redirect_vault(weed, public: str, tmp_path, extra: dict) -> LocalVault:  # noqa: F811
    s3 = {"endpoint": weed.endpoint, "addressing": "path", "public_endpoint": public, **extra}
    store = f"s3://{weed.bucket}/redirect-{uuid.uuid4().hex[:8]}"
    return LocalVault(
        config.from_dict({"state_dir": str(tmp_path / "state"), "vault": {"store": store, "s3": s3}})
    )


def test_the_servers_check_of_the_redirect_address_takes_the_stores_proxy(
    weed,  # noqa: F811
    store_side,  # noqa: F811
    proxy,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    tmp_path,
) -> None:
    """Readers are redirected to ``public_endpoint`` (here a listing proxy in front of SeaweedFS);
    the server fetches such a URL before it serves. That fetch goes where the store's own
    requests would: through ``[vault.s3] proxy`` when set, and around the environment's proxy
    when ``NO_PROXY`` names the address by its range."""
    vault = redirect_vault(weed, store_side.endpoint, tmp_path, {"proxy": proxy.url})
    try:
        assert redirects.problem(vault) is None
    finally:
        vault.close()
    assert [method for method, _ in proxy.requests()] == ["GET"] and len(store_side.requests) == 1

    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    monkeypatch.setenv("NO_PROXY", "127.0.0.0/8")
    vault = redirect_vault(weed, store_side.endpoint, tmp_path, {})
    try:
        assert redirects.problem(vault) is None
    finally:
        vault.close()
    assert len(proxy.requests()) == 1 and len(store_side.requests) == 2  # the second went around it
