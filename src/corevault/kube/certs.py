"""The webhook's TLS, managed by the webhook itself: a CA, a serving certificate, rotation.

The API server calls the webhook over TLS and trusts it through the ``caBundle`` of the
MutatingWebhookConfiguration. At start (and then daily) the webhook:

1. reads its Secret (``ca.crt``, ``ca.key``, ``tls.crt``, ``tls.key``); creates a CA and a
   serving certificate for ``SERVICE.NAMESPACE.svc`` when there is none;
2. issues a new serving certificate from the same CA when the current one expires within
   ``renew_before`` (and a new CA when that one does);
3. writes the Secret back, and puts the CA into the configuration's ``caBundle`` when it
   differs, so the API server trusts the new certificate before the webhook presents it.

Several webhook replicas may do this at once: the Secret is replaced with its
resourceVersion, so only one write wins and the others read the winner's certificates.
"""

from __future__ import annotations

import base64
import datetime
import json
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

CA_DAYS = 3650
SERVING_DAYS = 365
RENEW_BEFORE = datetime.timedelta(days=30)


@dataclass(frozen=True)
class Bundle:
    ca_cert: bytes
    ca_key: bytes
    cert: bytes
    key: bytes

    def as_secret_data(self) -> dict[str, str]:
        return {
            k: base64.b64encode(v).decode()
            for k, v in (
                ("ca.crt", self.ca_cert),
                ("ca.key", self.ca_key),
                ("tls.crt", self.cert),
                ("tls.key", self.key),
            )
        }

    @classmethod
    def from_secret_data(cls, data: dict[str, str]) -> Bundle:
        get = lambda k: base64.b64decode(data[k])  # noqa: E731
        return cls(get("ca.crt"), get("ca.key"), get("tls.crt"), get("tls.key"))


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def new_ca(now: datetime.datetime) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "corevault webhook CA")])
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)


def new_serving(
    ca_cert: bytes, ca_key: bytes, dns_names: list[str], now: datetime.datetime
) -> tuple[bytes, bytes]:
    ca = x509.load_pem_x509_certificate(ca_cert)
    signer = serialization.load_pem_private_key(ca_key, password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_names[0])]))
        .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=SERVING_DAYS))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in dns_names]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(signer, hashes.SHA256())  # type: ignore[arg-type]
    )  # fmt: skip
    return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)


def expires(pem: bytes) -> datetime.datetime:
    return x509.load_pem_x509_certificate(pem).not_valid_after_utc


def service_names(service: str, namespace: str) -> list[str]:
    return [
        f"{service}.{namespace}.svc",
        f"{service}.{namespace}.svc.cluster.local",
        f"{service}.{namespace}",
        service,
    ]


def renew(current: Bundle | None, names: list[str], now: datetime.datetime) -> Bundle | None:
    """The bundle to store, or None when ``current`` is good for longer than ``RENEW_BEFORE``."""
    if (
        current is not None
        and expires(current.cert) - now > RENEW_BEFORE
        and expires(current.ca_cert) - now > RENEW_BEFORE
    ):
        return None
    ca_cert, ca_key = (
        (current.ca_cert, current.ca_key)
        if current is not None
        and expires(current.ca_cert) - now > RENEW_BEFORE + datetime.timedelta(days=SERVING_DAYS)
        else new_ca(now)
    )
    cert, key = new_serving(ca_cert, ca_key, names, now)
    return Bundle(ca_cert, ca_key, cert, key)


def ensure(core_api, admission_api, namespace: str, secret: str, service: str, config_name: str,  # noqa: PLR0917
           now: datetime.datetime | None = None) -> Bundle:  # fmt: skip
    """Make the Secret and the caBundle current; returns the bundle to serve with."""
    from kubernetes.client.exceptions import ApiException

    now = now or datetime.datetime.now(datetime.UTC)
    names = service_names(service, namespace)
    for _ in range(5):
        try:
            found = json.loads(
                core_api.read_namespaced_secret(secret, namespace, _preload_content=False).data
            )
        except ApiException as e:
            if e.status != 404:
                raise
            found = None
        current = Bundle.from_secret_data(found["data"]) if found and found.get("data") else None
        fresh = renew(current, names, now)
        if fresh is None:
            bundle = current
            break
        body = {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                "metadata": {"name": secret, "namespace": namespace}, "data": fresh.as_secret_data()}  # fmt: skip
        try:
            if found is None:
                core_api.create_namespaced_secret(namespace, body, _preload_content=False)
            else:
                body["metadata"]["resourceVersion"] = found["metadata"]["resourceVersion"]
                core_api.replace_namespaced_secret(secret, namespace, body, _preload_content=False)
        except ApiException as e:
            if e.status in (409, 422):
                continue  # another replica won: read its certificates
            raise
        bundle = fresh
        break
    else:
        raise RuntimeError(f"could not settle the Secret {namespace}/{secret} after 5 tries")
    assert bundle is not None
    _publish_ca(admission_api, config_name, bundle.ca_cert)
    return bundle


def _publish_ca(admission_api, config_name: str, ca_cert: bytes) -> None:
    config = json.loads(
        admission_api.read_mutating_webhook_configuration(config_name, _preload_content=False).data
    )
    wanted = base64.b64encode(ca_cert).decode()
    ops = [
        {"op": "add", "path": f"/webhooks/{i}/clientConfig/caBundle", "value": wanted}
        for i, hook in enumerate(config.get("webhooks") or [])
        if (hook.get("clientConfig") or {}).get("caBundle") != wanted
    ]
    if ops:
        admission_api.patch_mutating_webhook_configuration(
            config_name, ops, _content_type="application/json-patch+json", _preload_content=False
        )
