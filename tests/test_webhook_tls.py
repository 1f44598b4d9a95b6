"""The webhook's own TLS: a CA and certificate kept in a Secret, rotated, trusted through caBundle."""

from __future__ import annotations

import base64
import datetime
import os
import ssl
import subprocess
import sys
from collections.abc import Iterator

import pytest
from cryptography import x509

from corevault.kube import certs
from testbed import servers
from testbed.fakekube import FakeKube
from tests.test_webhook import admit, seed_pod_without_a_volume

CLI = os.path.join(os.path.dirname(sys.executable), "corevault")
NOW = datetime.datetime(2026, 11, 28, tzinfo=datetime.UTC)


@pytest.fixture
def cluster(tmp_path) -> Iterator[tuple[FakeKube, object, object, str]]:
    from kubernetes import client
    from kubernetes import config as kconfig

    fake = FakeKube().start()
    kubeconfig = fake.kubeconfig(str(tmp_path / "kubeconfig"))
    kconfig.load_kube_config(config_file=kubeconfig)
    fake.objects[("mutatingwebhookconfigurations", "", "corevault")] = {
        "metadata": {"name": "corevault"},
        "webhooks": [{"name": "pods.corevault.io", "clientConfig": {"service": {"name": "corevault-webhook", "namespace": "corevault"}}}],
    }  # fmt: skip
    yield fake, client.CoreV1Api(), client.AdmissionregistrationV1Api(), kubeconfig
    fake.stop()


def ensure(cluster, now: datetime.datetime) -> certs.Bundle:
    _, core, admission, _ = cluster
    return certs.ensure(
        core, admission, "corevault", "corevault-webhook-tls", "corevault-webhook", "corevault", now=now
    )


def test_first_start_creates_the_ca_and_certificate_and_publishes_the_ca(cluster) -> None:
    fake = cluster[0]
    bundle = ensure(cluster, NOW)
    secret = fake.get("secrets", "corevault", "corevault-webhook-tls")
    assert certs.Bundle.from_secret_data(secret["data"]) == bundle
    cert, ca = x509.load_pem_x509_certificate(bundle.cert), x509.load_pem_x509_certificate(bundle.ca_cert)
    assert cert.issuer == ca.subject
    ca.public_key().verify(
        cert.signature,
        cert.tbs_certificate_bytes,
        __import__("cryptography.hazmat.primitives.asymmetric.ec", fromlist=["ECDSA"]).ECDSA(
            cert.signature_hash_algorithm
        ),
    )
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName
    )
    assert "corevault-webhook.corevault.svc" in names
    hook = fake.objects[("mutatingwebhookconfigurations", "", "corevault")]["webhooks"][0]
    assert base64.b64decode(hook["clientConfig"]["caBundle"]) == bundle.ca_cert


def test_nothing_changes_while_the_certificate_is_fresh(cluster) -> None:
    fake = cluster[0]
    first = ensure(cluster, NOW)
    puts = len([r for r in fake.requests if r.method in ("PUT", "POST", "PATCH")])
    assert ensure(cluster, NOW + datetime.timedelta(days=100)) == first
    assert len([r for r in fake.requests if r.method in ("PUT", "POST", "PATCH")]) == puts


def test_the_certificate_is_renewed_before_it_expires_under_the_same_ca(cluster) -> None:
    fake = cluster[0]
    first = ensure(cluster, NOW)
    later = ensure(cluster, NOW + datetime.timedelta(days=340))
    assert later.cert != first.cert and later.ca_cert == first.ca_cert
    assert certs.expires(later.cert) > NOW + datetime.timedelta(days=600)
    secret = fake.get("secrets", "corevault", "corevault-webhook-tls")
    assert certs.Bundle.from_secret_data(secret["data"]) == later


@pytest.mark.servers
def test_the_managed_certificate_serves_admission_reviews(cluster, tmp_path) -> None:
    fake, _, _, kubeconfig = cluster
    port = servers.free_port()
    cert, key = str(tmp_path / "tls" / "tls.crt"), str(tmp_path / "tls" / "tls.key")
    env = {**os.environ, "KUBECONFIG": kubeconfig}
    proc = subprocess.Popen(
        [CLI, "webhook", "--host", "127.0.0.1", "--port", str(port), "--cert", cert, "--key", key, "--manage-tls"],
        env=env, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        servers.wait_port(port)
        secret = fake.get("secrets", "corevault", "corevault-webhook-tls")
        ca = base64.b64decode(secret["data"]["ca.crt"])
        context = ssl.create_default_context(cadata=ca.decode())
        context.check_hostname = False  # the certificate names the Service, the test dials 127.0.0.1
        response = admit((f"https://127.0.0.1:{port}/mutate", context), seed_pod_without_a_volume())
        assert response["allowed"] is True and "patch" in response
    finally:
        proc.terminate()
        proc.wait(timeout=10)
