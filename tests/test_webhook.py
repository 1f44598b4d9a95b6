"""The admission webhook, over real TLS, with real AdmissionReview requests."""

from __future__ import annotations

import base64
import json
import os
import ssl
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator

import jsonpatch
import pytest

from testbed import servers, tls
from tests.conftest import starts_servers
from tests.test_kubectl import seed_pod

CLI = os.path.join(os.path.dirname(sys.executable), "corevault")


@pytest.fixture(scope="module")
@starts_servers
def webhook(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, ssl.SSLContext]]:
    cert, key = tls.self_signed(str(tmp_path_factory.mktemp("tls")))
    port = servers.free_port()
    proc = subprocess.Popen(
        [CLI, "webhook", "--host", "127.0.0.1", "--port", str(port), "--cert", cert, "--key", key],
        stderr=subprocess.PIPE,
    )
    servers.wait_port(port)
    context = ssl.create_default_context(cafile=cert)
    yield f"https://127.0.0.1:{port}/mutate", context
    proc.terminate()
    proc.wait(timeout=10)


def admit(webhook: tuple[str, ssl.SSLContext], pod: dict) -> dict:
    url, context = webhook
    doc = {
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": str(uuid.uuid4()), "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"}, "operation": "CREATE",
            "namespace": "default", "object": pod,
        },
    }  # fmt: skip
    req = urllib.request.Request(url, json.dumps(doc).encode(), {"Content-Type": "application/json"})  # noqa: S310
    with urllib.request.urlopen(req, context=context, timeout=10) as r:  # noqa: S310
        answer = json.loads(r.read())
    assert answer["kind"] == "AdmissionReview" and answer["response"]["uid"] == doc["request"]["uid"]
    return answer["response"]


def patched(pod: dict, response: dict) -> dict:
    if "patch" not in response:
        return pod
    assert response["patchType"] == "JSONPatch"
    return jsonpatch.apply_patch(pod, json.loads(base64.b64decode(response["patch"])))


def seed_pod_without_a_volume() -> dict:
    pod = seed_pod()
    pod["spec"] = {"containers": [{"name": "nginx", "image": "nginx:latest"}]}
    return pod


def test_the_seeds_pod_without_a_volume_gets_one_at_the_patterns_directory(webhook) -> None:
    response = admit(webhook, seed_pod_without_a_volume())
    assert response["allowed"] is True
    pod = patched(seed_pod_without_a_volume(), response)
    assert pod["spec"]["volumes"] == [{"name": "corevault-cores", "emptyDir": {"sizeLimit": "10Gi"}}]
    assert pod["spec"]["containers"][0]["volumeMounts"] == [
        {"name": "corevault-cores", "mountPath": "/data/dump-a"}
    ]
    again = admit(webhook, pod)  # admitting the result again changes nothing
    assert again["allowed"] is True and "patch" not in again


def test_a_pod_that_mounts_the_directory_already_is_left_alone(webhook) -> None:
    response = admit(webhook, seed_pod())
    assert response["allowed"] is True and "patch" not in response


def test_every_container_without_the_mount_gets_it_and_the_volume_annotation_is_honoured(webhook) -> None:
    pod = seed_pod_without_a_volume()
    pod["metadata"]["annotations"]["corevault.io/volume"] = "pvc:cores"
    pod["spec"]["containers"].append(
        {"name": "sidecar", "image": "envoy", "volumeMounts": [{"name": "x", "mountPath": "/etc/envoy"}]}
    )
    pod["spec"]["volumes"] = [{"name": "x", "configMap": {"name": "envoy"}}]
    result = patched(pod, admit(webhook, pod))
    assert result["spec"]["volumes"][-1] == {
        "name": "corevault-cores",
        "persistentVolumeClaim": {"claimName": "cores"},
    }
    assert result["spec"]["containers"][1]["volumeMounts"][-1] == {
        "name": "corevault-cores",
        "mountPath": "/data/dump-a",
    }


@pytest.mark.parametrize(
    ("bad", "words"),
    [
        ("../x/core-%p", "not an absolute path"),
        ("relative/core", "not an absolute path"),
        ("/data/../etc/core", "'..' component"),
        ("|/bin/sh", "not a pipe"),
    ],
)
def test_bad_patterns_are_denied_with_the_validators_message(webhook, bad: str, words: str) -> None:
    pod = seed_pod_without_a_volume()
    pod["metadata"]["annotations"] = {"alibabacloud.com/core-pattern": bad}
    response = admit(webhook, pod)
    assert response["allowed"] is False and "patch" not in response
    assert words in response["status"]["message"] and response["status"]["message"].startswith(
        "corevault: core pattern"
    )


def test_a_bucket_volume_annotation_mounts_the_buckets_claim(webhook) -> None:
    pod = seed_pod_without_a_volume()
    pod["metadata"]["annotations"]["corevault.io/volume"] = "oss:oss-test"
    result = patched(pod, admit(webhook, pod))
    assert result["spec"]["volumes"] == [
        {"name": "corevault-cores", "persistentVolumeClaim": {"claimName": "corevault-oss-oss-test"}}
    ]


def test_a_bad_volume_annotation_is_denied(webhook) -> None:
    pod = seed_pod_without_a_volume()
    pod["metadata"]["annotations"]["corevault.io/volume"] = "tmpfs"
    response = admit(webhook, pod)
    assert response["allowed"] is False and "pvc:CLAIM" in response["status"]["message"]


def test_pods_without_the_annotation_pass_untouched(webhook) -> None:
    pod = seed_pod_without_a_volume()
    pod["metadata"]["annotations"] = {"team": "shop"}
    response = admit(webhook, pod)
    assert response == {"uid": response["uid"], "allowed": True}


def test_an_empty_corevault_pattern_beside_the_acs_one_uses_the_acs_one(webhook) -> None:
    pod = seed_pod_without_a_volume()
    pod["metadata"]["annotations"] = {
        "corevault.io/core-pattern": "", "alibabacloud.com/core-pattern": "/data/dump-b/core-%e",
    }  # fmt: skip
    response = admit(webhook, pod)
    assert response["allowed"] is True
    [mount] = patched(pod, response)["spec"]["containers"][0]["volumeMounts"]
    assert mount["mountPath"] == "/data/dump-b"


def test_corevaults_pattern_wins_over_the_acs_one(webhook) -> None:
    pod = seed_pod_without_a_volume()
    pod["metadata"]["annotations"] = {
        "corevault.io/core-pattern": "/cores/core-%p", "alibabacloud.com/core-pattern": "/data/dump-b/core-%e",
    }  # fmt: skip
    [mount] = patched(pod, admit(webhook, pod))["spec"]["containers"][0]["volumeMounts"]
    assert mount["mountPath"] == "/cores"
