"""The clouds' workload identity flows, as far as local endpoints stand in for the clouds.

A pod's projected ServiceAccount token is a file that the kubelet rewrites before it expires;
each SDK exchanges the file's content for short-lived credentials at its token service and
must read the file again when those expire. Here the token service is
:mod:`testbed.tokens` on 127.0.0.1 and the stores are real servers (SeaweedFS for S3,
fake-gcs-server for GCS), opened from ``[vault]`` settings as the agent opens them
(:func:`corevault.vault.stores.vault_store`):

- S3 with IRSA's variables (``AWS_WEB_IDENTITY_TOKEN_FILE``, ``AWS_ROLE_ARN``) and
  ``AWS_ENDPOINT_URL_STS`` at the local endpoint, which answers with SeaweedFS's key.
- GCS with an ``external_account`` credential file (a file-sourced subject token, ``token_url``
  at the local endpoint).

- Azure Workload Identity (``AZURE_FEDERATED_TOKEN_FILE``, ``AZURE_CLIENT_ID``,
  ``AZURE_TENANT_ID``, ``AZURE_AUTHORITY_HOST`` at the local endpoint over TLS) against Azurite
  with OAuth on: the exchange with the file's token. Not its re-reading of a rewritten file, which
  azure-identity does at most every 10 minutes, nor a refused token, which the storage SDK's
  retries (15 s and more apart) take over a minute to report.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator

import pytest

from corevault import config
from corevault.vault import blobs, stores
from testbed import clouds, servers, tokens
from tests.conftest import starts_servers

pytestmark = pytest.mark.servers

LIFETIME = 2  # seconds the local endpoint's credentials live


@pytest.fixture(scope="module")
@starts_servers
def seaweed() -> Iterator[servers.Seaweed]:
    with servers.seaweed() as server:
        yield server


@pytest.fixture(scope="module")
@starts_servers
def azurite_oauth() -> Iterator[clouds.Azurite]:
    with clouds.azurite(oauth=True) as server:
        yield server


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """No credentials but the flow under test: nothing from the environment or a home directory."""
    for name in list(os.environ):
        if name.startswith(("AWS_", "GOOGLE_", "AZURE_")) or name == "CLOUDSDK_CONFIG":
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "no-gcloud"))


def agent_store(tmp_path, url: str, table: str) -> blobs.BlobStore:
    """The vault's store as the agent opens it: from its settings file."""
    path = tmp_path / "corevault.toml"
    path.write_text(f'[vault]\nstore = "{url}"\n{table}')
    return stores.vault_store(config.load(str(path)))


def put(store: blobs.BlobStore, tmp_path, key: str) -> bytes:
    data = os.urandom(100_000)
    source = tmp_path / "core.zst"
    source.write_bytes(data)
    assert store.put_file(key, str(source)).size == len(data)
    with store.open(key) as f:
        assert f.read() == data
    return data


def rewrite(path, token: str) -> None:
    """As the kubelet rotates a projected token: a new file renamed over the old one."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(token)
    os.replace(tmp, path)


def wait_expired(started: float) -> None:
    time.sleep(max(0.0, started + LIFETIME + 0.5 - time.monotonic()))


def exchanges_rotated_file(
    store: blobs.BlobStore, sts: tokens.TokenEndpoint, flow: str, token_file, tmp_path, *, refusal: str
) -> None:
    """The store works with the file's token, reads the file again once its credentials expired,
    and fails with its own error (saying ``refusal``) when the service refuses the token."""
    started = time.monotonic()
    put(store, tmp_path, "crashes/a/core.zst")
    assert set(sts.subjects(flow)) == {"eyJ.first-projected-token.sig"}

    rewrite(token_file, "eyJ.rotated-projected-token.sig")
    wait_expired(started)
    put(store, tmp_path, "crashes/b/core.zst")  # the same store object: its credentials expired
    assert sts.subjects(flow)[-1] == "eyJ.rotated-projected-token.sig"

    # A token the service refuses is no credential: the upload fails with the store's error.
    sts.refused.add("eyJ.revoked.sig")
    rewrite(token_file, "eyJ.revoked.sig")
    time.sleep(LIFETIME + 0.5)
    with pytest.raises(blobs.StoreError, match=refusal):
        put(store, tmp_path, "crashes/c/core.zst")
    assert sts.subjects(flow)[-1] == "eyJ.revoked.sig"


def test_s3_web_identity_token_file(seaweed, clean_env, monkeypatch, tmp_path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("eyJ.first-projected-token.sig")
    with tokens.token_endpoint(servers.KEY, servers.SECRET, LIFETIME) as sts:
        monkeypatch.setenv("AWS_WEB_IDENTITY_TOKEN_FILE", str(token_file))
        monkeypatch.setenv("AWS_ROLE_ARN", "arn:aws:iam::123456789012:role/corevault-agent")
        monkeypatch.setenv("AWS_ROLE_SESSION_NAME", "corevault")
        monkeypatch.setenv("AWS_ENDPOINT_URL_STS", sts.url)
        s3 = f'[vault.s3]\nendpoint = "{seaweed.endpoint}"\naddressing = "path"\n'
        store = agent_store(tmp_path, f"s3://{seaweed.bucket}/{uuid.uuid4().hex}", s3)

        exchanges_rotated_file(store, sts, "aws", token_file, tmp_path, refusal="InvalidIdentityToken")


def test_gcs_external_account_token_file(gcs, clean_env, monkeypatch, tmp_path) -> None:
    bucket = "identity-" + uuid.uuid4().hex[:12]
    gcs.create_bucket(bucket)
    token_file = tmp_path / "token"
    token_file.write_text("eyJ.first-projected-token.sig")
    # google-auth counts a token as expired 3 min 45 s before its end: the endpoint's tokens
    # live that long and LIFETIME seconds more
    with tokens.token_endpoint(lifetime=225 + LIFETIME) as sts:
        credentials = tmp_path / "external-account.json"
        credentials.write_text(json.dumps({
            "type": "external_account",
            "audience": "//iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/p/providers/k8s",
            "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
            "token_url": f"{sts.url}/v1/token",
            "credential_source": {"file": str(token_file)},
        }))  # fmt: skip
        monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(credentials))
        table = f'[vault.gcs]\nendpoint = "{gcs.endpoint}"\nproject = "corevault"\n'
        store = agent_store(tmp_path, f"gs://{bucket}/vault", table)

        exchanges_rotated_file(store, sts, "gcp", token_file, tmp_path, refusal="invalid_grant")


def test_azure_workload_identity_token_file(azurite_oauth, clean_env, monkeypatch, tmp_path) -> None:
    tenant, client = "72f988bf-86f1-41af-91ab-2d7cd011db47", "00000000-0000-0000-0000-0000000000c0"
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", azurite_oauth.tls[0])  # the token service shares the certificate
    container = "identity-" + uuid.uuid4().hex[:12]
    azurite_oauth.create_container(container)
    token_file = tmp_path / "azure-identity-token"
    token_file.write_text("eyJ.first-projected-token.sig")
    with tokens.token_endpoint(tls=azurite_oauth.tls) as sts:
        monkeypatch.setenv("AZURE_FEDERATED_TOKEN_FILE", str(token_file))
        monkeypatch.setenv("AZURE_CLIENT_ID", client)
        monkeypatch.setenv("AZURE_TENANT_ID", tenant)
        monkeypatch.setenv("AZURE_AUTHORITY_HOST", sts.url)
        table = f'[vault.azure]\naccount_url = "{azurite_oauth.account_url}"\n'
        store = agent_store(tmp_path, f"az://{container}/vault", table)
        put(store, tmp_path, "crashes/a/core.zst")
        assert set(sts.subjects("azure")) == {"eyJ.first-projected-token.sig"}
