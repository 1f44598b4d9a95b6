"""Buckets mounted through a FUSE CSI driver as a pod's core volume, the way the seed does it.

The seed's OSS example is a PersistentVolume of the OSS CSI driver (ossfs, a fork of
s3fs-fuse) with the bucket, endpoint, path and ``otherOpts`` in its ``volumeAttributes``,
a PersistentVolumeClaim that selects it by label, and the pod's volume naming the claim.
Neither the OSS driver nor k8s-csi-s3 declares inline (ephemeral) volumes, so the same
three objects are what corevault makes: :func:`objects` gives the PV and the PVC,
:meth:`BucketVolume.pod_volume` the pod's volume. Credentials come from a Secret named by
``nodePublishSecretRef`` rather than sitting in the PV as the seed's ``akId``/``akSecret``.

Specs read ``KIND:BUCKET`` or ``KIND:BUCKET:/PATH`` with KIND one of :data:`DRIVERS`.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from corevault.errors import BadInput

# What the seed's example passes: no stat cache (cores appear at once to every reader) and
# the mount readable by the pod's other users.
OSS_OPTIONS = "-o max_stat_cache_size=0 -o allow_other"
SIZE = "50Gi"  # nominal: a bucket has no capacity, the API wants one
LABEL_MAX = 63  # a label value's length, as the API server validates it


@dataclass(frozen=True, slots=True)
class Driver:
    name: str  # the CSIDriver
    secret: str  # the default Secret with the bucket's credentials
    needs_endpoint: bool


DRIVERS = {
    "oss": Driver("ossplugin.csi.alibabacloud.com", "corevault-oss", needs_endpoint=True),
    "s3fs": Driver("ru.yandex.s3.csi", "csi-s3-secret", needs_endpoint=False),  # k8s-csi-s3
}
USAGE = "oss:BUCKET[:/PATH] or s3fs:BUCKET[:/PATH]"
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]\Z")


@dataclass(frozen=True, slots=True)
class BucketVolume:
    kind: str
    bucket: str
    path: str = "/"

    @property
    def driver(self) -> Driver:
        return DRIVERS[self.kind]

    @property
    def claim_name(self) -> str:
        """The PVC's name: the bucket's, plus a digest of the path when it is not the root."""
        name = f"corevault-{self.kind}-{self.bucket.replace('.', '-')}"
        if self.path != "/":
            name += "-" + hashlib.sha256(self.path.encode()).hexdigest()[:8]
        return name

    def pod_volume(self, name: str) -> dict:
        return {"name": name, "persistentVolumeClaim": {"claimName": self.claim_name}}


def parse(spec: str) -> BucketVolume | None:
    """The bucket volume ``spec`` names; None when it names no FUSE driver; BadInput when malformed."""
    kind, sep, rest = spec.partition(":")
    if kind not in DRIVERS:
        return None
    bucket, _, path = rest.partition(":")
    path = path or "/"
    if not sep or not _BUCKET.match(bucket) or not path.startswith("/") or "/../" in f"{path}/":
        raise BadInput(
            f"volume {spec!r}: use {USAGE} (a bucket name of 3-63 lowercase letters, digits, '.', '-')"
        )
    return BucketVolume(kind, bucket, path)


def objects(volume: BucketVolume, namespace: str, *, endpoint: str | None, secret: str | None) -> list[dict]:
    """The PersistentVolume and PersistentVolumeClaim that mount ``volume``, as in the seed."""
    driver = volume.driver
    if driver.needs_endpoint and not endpoint:
        raise BadInput(f"{volume.kind} volumes need the bucket's endpoint: pass --endpoint (e.g. {_EXAMPLE})")
    pv_name = f"{volume.claim_name}-{namespace}"
    secret_ref = {"name": secret or driver.secret, "namespace": namespace}
    if volume.kind == "oss":
        csi = {
            "driver": driver.name,
            "volumeHandle": pv_name,
            "nodePublishSecretRef": secret_ref,
            "volumeAttributes": {
                "bucket": volume.bucket, "url": endpoint, "path": volume.path, "otherOpts": OSS_OPTIONS,
            },
        }  # fmt: skip
    else:
        csi = {
            "driver": driver.name,
            "volumeHandle": f"{volume.bucket}{volume.path}".rstrip("/"),
            "controllerPublishSecretRef": secret_ref,
            "nodePublishSecretRef": secret_ref,
            "nodeStageSecretRef": secret_ref,
            "volumeAttributes": {"capacity": SIZE, "mounter": "s3fs", "options": "-o allow_other"},
        }
    label = {"corevault.io/pv-name": label_value(pv_name)}
    common = {"storageClassName": "", "accessModes": ["ReadWriteMany"]}
    pv = {
        "apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": pv_name, "labels": label},
        "spec": {
            **common, "capacity": {"storage": SIZE}, "persistentVolumeReclaimPolicy": "Retain", "csi": csi,
            "claimRef": {"namespace": namespace, "name": volume.claim_name},
        },
    }  # fmt: skip
    pvc = {
        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {"name": volume.claim_name, "namespace": namespace},
        "spec": {**common, "resources": {"requests": {"storage": SIZE}}, "selector": {"matchLabels": label}},
    }  # fmt: skip
    return [pv, pvc]


def label_value(name: str) -> str:
    """``name`` as a label's value, which the API server takes up to :data:`LABEL_MAX` characters:
    a longer one (a bucket's and a namespace's names reach 150) is cut, and a digest of the
    whole name ends it, so that each volume's claim still selects its own volume alone."""
    if len(name) <= LABEL_MAX:
        return name
    return f"{name[: LABEL_MAX - 9]}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


_EXAMPLE = "oss-cn-hangzhou-internal.aliyuncs.com"
