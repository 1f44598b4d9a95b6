"""deploy/ renders with kustomize, and every object validates against Kubernetes' own schemas."""

from __future__ import annotations

import glob
import os
import subprocess
import sys

import pytest
import yaml

from corevault import hostsetup

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KUBERNETES = "1.37.0"


def rendered() -> list[dict]:
    out = subprocess.run(
        ["kubectl", "kustomize", os.path.join(ROOT, "deploy")], capture_output=True, text=True, check=True
    )
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def validate(docs: list[dict], tmp_path) -> subprocess.CompletedProcess:
    paths = []
    for i, doc in enumerate(docs):
        path = tmp_path / f"{i}.yaml"
        path.write_text(yaml.safe_dump(doc))
        paths.append(str(path))
    validator = os.path.join(os.path.dirname(sys.executable), "kubernetes-validate")
    return subprocess.run(
        [validator, "--strict", "-k", KUBERNETES, *paths], capture_output=True, text=True, check=False
    )


@pytest.mark.servers
def test_kustomize_renders_and_every_object_validates(tmp_path) -> None:
    docs = rendered()
    kinds = sorted(d["kind"] for d in docs)
    assert (
        kinds.count("DaemonSet") == 1 and "MutatingWebhookConfiguration" in kinds and "ClusterRole" in kinds
    )
    assert all(
        d["metadata"].get("namespace") == "corevault"
        for d in docs
        if d["kind"] not in ("Namespace", "ClusterRole", "ClusterRoleBinding", "MutatingWebhookConfiguration")
    )
    result = validate(docs, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("passed") == len(docs)


@pytest.mark.parametrize(
    "example", sorted(glob.glob(os.path.join(ROOT, "deploy", "examples", "*.yaml"))), ids=os.path.basename
)
def test_the_seeds_examples_validate(example: str, tmp_path) -> None:
    with open(example) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    result = validate(docs, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    pod = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]
    assert pod["metadata"]["annotations"]["alibabacloud.com/core-pattern"] == "/data/dump-a/core-%E-%p-%t"


@pytest.mark.servers
def test_least_privilege_for_the_agent_and_a_webhook_that_never_blocks_pods() -> None:
    docs = {(d["kind"], d["metadata"]["name"]): d for d in rendered()}
    rules = docs[("ClusterRole", "corevault-agent")]["rules"]
    assert rules == [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
    ]
    assert docs[("ClusterRole", "corevault-webhook")]["rules"] == [
        {"apiGroups": ["admissionregistration.k8s.io"], "resources": ["mutatingwebhookconfigurations"],
         "resourceNames": ["corevault"], "verbs": ["get", "patch"]},
    ]  # fmt: skip
    assert {tuple(r["verbs"]) for r in docs[("Role", "corevault-webhook")]["rules"]} == {
        ("create",),
        ("get", "update"),
    }
    [hook] = docs[("MutatingWebhookConfiguration", "corevault")]["webhooks"]
    assert hook["failurePolicy"] == "Ignore" and hook["clientConfig"]["service"]["path"] == "/mutate"
    expression = hook["matchConditions"][0]["expression"]
    assert "corevault.io/core-pattern" in expression and "alibabacloud.com/core-pattern" in expression


@pytest.mark.servers
def test_the_daemonset_runs_an_agent_command_line_the_cli_accepts_with_the_forwarder_the_image_ships() -> (
    None
):
    [ds] = [d for d in rendered() if d["kind"] == "DaemonSet"]
    [container] = ds["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    assert args[args.index("--install") + 1] == "auto"  # the socket where the kernel has it, else the pipe
    forwarder = args[args.index("--forwarder") + 1]
    with open(os.path.join(ROOT, "Dockerfile")) as f:
        assert f"COPY --from=forward /corevault-forward {forwarder}\n" in f.read()
    cli = os.path.join(os.path.dirname(sys.executable), "corevault")
    parsed = subprocess.run([cli, *args, "--help"], capture_output=True, text=True, check=False)
    assert parsed.returncode == 0, parsed.stderr  # an unknown option or command fails the parse
    state = next(m for m in container["volumeMounts"] if m["name"] == "state")
    host = next(v for v in ds["spec"]["template"]["spec"]["volumes"] if v["name"] == "state")
    assert state["mountPath"] == host["hostPath"]["path"]  # the kernel runs the forwarder by its host path
    forwarder_path, socket_path = hostsetup.forwarder_paths(host["hostPath"]["path"])
    hostsetup.pipe_pattern(
        forwarder_path, forward_to=socket_path
    )  # raises if the kernel's 127 bytes overflow
    assert len(("@@" + hostsetup.socket_path(host["hostPath"]["path"])).encode()) <= 127


@pytest.mark.servers
def test_the_server_checks_callers_with_the_cluster_and_nothing_more() -> None:
    docs = {(d["kind"], d["metadata"]["name"]): d for d in rendered()}
    assert docs[("ClusterRole", "corevault-server")]["rules"] == [
        {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]},
        {"apiGroups": ["authorization.k8s.io"], "resources": ["subjectaccessreviews"], "verbs": ["create"]},
    ]
    deployment = docs[("Deployment", "corevault-server")]
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    assert "--kubernetes" in args and "--no-auth" not in args
    cli = os.path.join(os.path.dirname(sys.executable), "corevault")
    parsed = subprocess.run([cli, *args, "--help"], capture_output=True, text=True, check=False)
    assert parsed.returncode == 0, parsed.stderr
    service = docs[("Service", "corevault-server")]
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
