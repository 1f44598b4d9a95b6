"""``kubectl corevault`` through the real kubectl's plugin dispatch, against a fake API server.

The fake (testbed/fakekube.py) says what it does not emulate; in particular no exec
stream, so attaching is checked as the exact ``kubectl exec`` command (``--no-attach``).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from collections.abc import Iterator

import pytest
import yaml

from testbed.fakekube import FakeKube

SEED_POD = "coredump-emptydir-volume-test-xxxxx"
NGINX = "registry.cn-hangzhou.aliyuncs.com/acs-sample/nginx:latest"


def seed_pod(
    name: str = SEED_POD,
    annotations: dict | None = None,
    mount: str = "/data/dump-a/",
    phase: str = "Running",
) -> dict:
    """The pod of ACS's emptyDir example, as the API server returns it."""
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "annotations": {"alibabacloud.com/core-pattern": "/data/dump-a/core-%E-%p-%t"} if annotations is None else annotations},
        "spec": {
            "containers": [{"name": "nginx", "image": NGINX, "volumeMounts": [{"name": "emptydir-volume", "mountPath": mount}]}],
            "volumes": [{"name": "emptydir-volume", "emptyDir": {}}],
        },
        "status": {"phase": phase},
    }  # fmt: skip


@pytest.fixture
def kube(tmp_path) -> Iterator[tuple[FakeKube, dict]]:
    fake = FakeKube().start()
    env = {
        **os.environ,
        "KUBECONFIG": fake.kubeconfig(str(tmp_path / "kubeconfig")),
        "PATH": os.path.dirname(sys.executable) + ":" + os.environ["PATH"],
    }
    yield fake, env
    fake.stop()


def kubectl(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["kubectl", "corevault", *args], capture_output=True, text=True, env=env, timeout=120, check=False
    )


@pytest.mark.servers
def test_seed_emptydir_scenario_builds_the_guides_ephemeral_container(kube) -> None:
    fake, env = kube
    fake.add("pods", seed_pod())
    out = kubectl(env, "debug", SEED_POD, "--no-attach")
    assert out.returncode == 0, out.stderr
    [patch] = [r for r in fake.requests if r.method == "PATCH"]
    assert patch.path == f"/api/v1/namespaces/default/pods/{SEED_POD}/ephemeralcontainers"
    assert patch.content_type == "application/strategic-merge-patch+json"
    [container] = patch.body["spec"]["ephemeralContainers"]
    assert container["name"].startswith("corevault-debug-")
    assert container["volumeMounts"] == [{"name": "emptydir-volume", "mountPath": "/data/dump-a/"}]
    assert container["targetContainerName"] == "nginx" and container["image"] == NGINX
    assert container["stdin"] is True and container["tty"] is True
    assert out.stdout.strip() == (
        f"kubectl exec -it -n default {SEED_POD} -c {container['name']} -- sh -c 'cd /data/dump-a && exec sh'"
    )
    status = fake.get("pods", "default", SEED_POD)["status"]["ephemeralContainerStatuses"]
    assert "running" in status[0]["state"]


@pytest.mark.servers
@pytest.mark.parametrize(
    ("ours", "directory"), [("", "/data/dump-a"), (" ", "/data/dump-a"), ("/cores/core-%p", "/cores")]
)
def test_debug_reads_the_pattern_by_the_handlers_rule(kube, ours: str, directory: str) -> None:
    """A blank corevault.io/core-pattern is absent; a set one wins over alibabacloud.com's."""
    fake, env = kube
    both = {"corevault.io/core-pattern": ours, "alibabacloud.com/core-pattern": "/data/dump-a/core-%e"}
    pod = seed_pod(annotations=both)
    pod["spec"]["containers"][0]["volumeMounts"].append({"name": "cores", "mountPath": "/cores"})
    fake.add("pods", pod)
    out = kubectl(env, "debug", SEED_POD, "--no-attach")
    assert out.returncode == 0, out.stderr
    [patch] = [r for r in fake.requests if r.method == "PATCH"]
    [container] = patch.body["spec"]["ephemeralContainers"]
    assert container["volumeMounts"][0]["mountPath"] == directory + "/"


@pytest.mark.servers
def test_every_attempt_gets_a_new_container_name(kube) -> None:
    fake, env = kube
    fake.add("pods", seed_pod())
    for _ in range(2):
        assert kubectl(env, "debug", SEED_POD, "--no-attach", "--gdb").returncode == 0
    names = [c["name"] for c in fake.get("pods", "default", SEED_POD)["spec"]["ephemeralContainers"]]
    assert len(names) == 2 and len(set(names)) == 2


@pytest.mark.servers
def test_gdb_on_the_newest_core(kube) -> None:
    fake, env = kube
    fake.add("pods", seed_pod())
    out = kubectl(env, "debug", SEED_POD, "--no-attach", "--gdb", "--image", "gdb-tools:1")
    inner = shlex.split(out.stdout)[-1]  # what sh runs in the debug container
    assert "exec gdb -q -nx -iex 'set auto-load off' -c" in inner and "ls -t" in inner
    patch = next(r for r in fake.requests if r.method == "PATCH")
    assert patch.body["spec"]["ephemeralContainers"][0]["image"] == "gdb-tools:1"


def test_gdb_in_the_cores_directory_runs_no_gdbinit_the_pod_left_there(tmp_path) -> None:
    """The pod writes the directory gdb starts in: a ``.gdbinit`` there is code. gdb refuses it
    under its default ``auto-load safe-path``, not under one the debug image's own ``~/.gdbinit``
    widened; corevault's command reads neither. The command is run as kubectl would run it in the
    debug container, with the real gdb, on the pod's directory (a core and the planted file)."""
    from corevault.kube import debug

    volume, home = tmp_path / "dump-a", tmp_path / "home"
    volume.mkdir()
    home.mkdir()
    (home / ".gdbinit").write_text("set auto-load safe-path /\n")
    marker = tmp_path / "ran"
    (volume / ".gdbinit").write_text(f"shell touch {marker}\n")
    (volume / "core-crasher-1").write_bytes(b"\x7fELF not really a core")
    target = debug.Target("default", SEED_POD, "app", "/data/dump-a/core-%e-%p", str(volume), "cores")
    inner = debug.shell_command(target, "corevault-debug-1", gdb=True)[-1]
    plain = inner.replace("-nx -iex 'set auto-load off' ", "")  # the command as it was
    assert plain != inner
    for command, runs in ((plain, True), (inner, False)):
        marker.unlink(missing_ok=True)
        subprocess.run(["sh", "-c", command], env={**os.environ, "HOME": str(home)},
                       stdin=subprocess.DEVNULL, capture_output=True, timeout=60, check=False)  # fmt: skip
        assert marker.exists() is runs, command


@pytest.mark.servers
@pytest.mark.parametrize(
    ("setup", "words"),
    [
        (lambda f: f.add("pods", seed_pod(annotations={})), "has no corevault.io/core-pattern"),
        (lambda f: f.add("pods", seed_pod(mount="/var/log")), "no volume is mounted at /data/dump-a"),
        (lambda f: f.add("pods", seed_pod(phase="Succeeded")), "has terminated"),
        (
            lambda f: (f.add("pods", seed_pod()), f.forbid("PATCH", "/ephemeralcontainers$")),
            "verbs [patch] on resources [pods/ephemeralcontainers]",
        ),
        (
            lambda f: (f.add("pods", seed_pod()), setattr(f, "ephemeral_supported", False)),
            "Kubernetes 1.23 or newer",
        ),
        (lambda f: f.forbid("GET", "/pods/"), "verbs [get] on resources [pods]"),
        (
            lambda f: None,
            f"no pod '{SEED_POD}' in namespace default; 'kubectl get pods -n default' lists them",
        ),
        (lambda f: f.stop(), "cannot reach the API server at http://127.0.0.1:"),
    ],
)
def test_debug_errors_say_what_to_do(kube, setup, words: str) -> None:
    fake, env = kube
    setup(fake)
    out = kubectl(env, "debug", SEED_POD, "--no-attach")
    assert out.returncode == 1, out.stdout
    assert words in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


def web_deployment() -> dict:
    return {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web", "namespace": "default"},
        "spec": {"template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [
            {"name": "nginx", "image": NGINX}, {"name": "sidecar", "image": "envoy:1"}]}}},
    }  # fmt: skip


@pytest.mark.servers
def test_enable_adds_annotation_volume_and_mounts_once(kube) -> None:
    fake, env = kube
    fake.add("deployments", web_deployment())
    dry = kubectl(env, "enable", "deployment/web", "--pattern", "/data/dump-a/core-%e-%p", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert not [r for r in fake.requests if r.method == "PATCH"]
    assert json.loads(dry.stdout)["spec"]["template"]["metadata"]["annotations"] == {
        "corevault.io/core-pattern": "/data/dump-a/core-%e-%p"
    }
    for _ in range(2):
        assert (
            kubectl(env, "enable", "deployment/web", "--pattern", "/data/dump-a/core-%e-%p").returncode == 0
        )
    template = fake.get("deployments", "default", "web")["spec"]["template"]
    assert template["metadata"]["annotations"]["corevault.io/core-pattern"] == "/data/dump-a/core-%e-%p"
    assert template["spec"]["volumes"] == [{"name": "corevault-cores", "emptyDir": {"sizeLimit": "10Gi"}}]
    for c in template["spec"]["containers"]:
        assert c["volumeMounts"] == [{"name": "corevault-cores", "mountPath": "/data/dump-a"}]


@pytest.mark.servers
@pytest.mark.parametrize(
    ("volume", "source"),
    [
        ("pvc:cores", {"persistentVolumeClaim": {"claimName": "cores"}}),
        ("nfs:nas.example:/export/cores", {"nfs": {"server": "nas.example", "path": "/export/cores"}}),
    ],
)
def test_enable_with_a_claim_or_nfs(kube, volume: str, source: dict) -> None:
    fake, env = kube
    fake.add("deployments", web_deployment())
    assert kubectl(env, "enable", "web", "--pattern", "/cores/core-%p", "--volume", volume).returncode == 0
    assert fake.get("deployments", "default", "web")["spec"]["template"]["spec"]["volumes"] == [
        {"name": "corevault-cores", **source}
    ]


@pytest.mark.servers
@pytest.mark.parametrize(
    ("args", "code", "words"),
    [
        (["enable", "deployment/web", "--pattern", "relative/core"], 2, "not an absolute path"),
        (
            ["enable", "deployment/web", "--pattern", "/d/core", "--volume", "tmpfs"],
            2,
            "use emptydir, pvc:CLAIM, nfs:SERVER:/PATH, oss:BUCKET[:/PATH] or s3fs:BUCKET[:/PATH]",
        ),
        (
            ["enable", "deployment/web", "--pattern", "/d/core", "--volume", "oss:oss-test"],
            2,
            "oss volumes need the bucket's endpoint: pass --endpoint",
        ),
        (
            ["enable", "deployment/web", "--pattern", "/d/core", "--volume", "oss:Bad_Bucket"],
            2,
            "use oss:BUCKET",
        ),
        (["enable", "cronjob/web", "--pattern", "/d/core"], 2, "use deployment/NAME"),
        (["enable", "deployment/wbe", "--pattern", "/d/core"], 1, "no deployment 'wbe' in namespace default"),
    ],
)
def test_enable_must_fail(kube, args: list[str], code: int, words: str) -> None:
    fake, env = kube
    fake.add("deployments", web_deployment())
    out = kubectl(env, *args)
    assert out.returncode == code and words in out.stderr, out.stderr
    assert not [r for r in fake.requests if r.method == "PATCH"]


def seed_oss_volume() -> tuple[dict, dict]:
    """The PersistentVolume and the pod's mount of deploy/examples/oss.yaml."""
    with open(os.path.join(os.path.dirname(__file__), "..", "deploy", "examples", "oss.yaml")) as f:
        docs = {d["kind"]: d for d in yaml.safe_load_all(f)}
    [container] = docs["Deployment"]["spec"]["template"]["spec"]["containers"]
    return docs["PersistentVolume"], container["volumeMounts"][0]


@pytest.mark.servers
def test_enable_with_an_oss_bucket_makes_the_seeds_volume_and_claim(kube) -> None:
    fake, env = kube
    fake.add("deployments", web_deployment())
    seed_pv, seed_mount = seed_oss_volume()
    seed_csi = seed_pv["spec"]["csi"]
    attrs = seed_csi["volumeAttributes"]
    args = [
        "enable",
        "web",
        "--pattern",
        "/data/dump-a/core-%E-%p-%t",
        "--volume",
        f"oss:{attrs['bucket']}:/cores",
    ]
    args += ["--endpoint", attrs["url"], "--secret", "oss-keys"]
    for _ in range(2):  # a second run finds the volume and its claim and keeps them
        out = kubectl(env, *args)
        assert out.returncode == 0, out.stderr
    [pv] = [o for (res, _, _), o in fake.objects.items() if res == "persistentvolumes"]
    [pvc] = [o for (res, _, _), o in fake.objects.items() if res == "persistentvolumeclaims"]
    csi = pv["spec"]["csi"]
    assert csi["driver"] == seed_csi["driver"] == "ossplugin.csi.alibabacloud.com"
    assert csi["volumeAttributes"] == {
        "bucket": attrs["bucket"], "url": attrs["url"], "otherOpts": attrs["otherOpts"], "path": "/cores",
    }  # fmt: skip
    assert csi["nodePublishSecretRef"] == {"name": "oss-keys", "namespace": "default"}
    assert pv["spec"]["accessModes"] == seed_pv["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pvc["spec"]["selector"]["matchLabels"].items() <= pv["metadata"]["labels"].items()
    assert pv["spec"]["claimRef"] == {"namespace": "default", "name": pvc["metadata"]["name"]}
    template = fake.get("deployments", "default", "web")["spec"]["template"]
    assert template["spec"]["volumes"] == [
        {"name": "corevault-cores", "persistentVolumeClaim": {"claimName": pvc["metadata"]["name"]}}
    ]
    for c in template["spec"]["containers"]:
        assert c["volumeMounts"] == [
            {"name": "corevault-cores", "mountPath": seed_mount["mountPath"].rstrip("/")}
        ]
    posts = [r.path for r in fake.requests if r.method == "POST"]
    assert posts == ["/api/v1/persistentvolumes", "/api/v1/namespaces/default/persistentvolumeclaims"]


@pytest.mark.servers
def test_enable_with_long_bucket_and_namespace_names_makes_a_volume_its_claim_selects(kube) -> None:
    """A bucket's name and a namespace's each reach 63 characters, the volume's name 150; its
    label, which the API server takes up to 63 (the fake validates names and labels as it
    does), still names it alone: two such buckets' claims each select their own volume."""
    fake, env = kube
    ns = "team-" + "n" * 58
    fake.add("deployments", {**web_deployment(), "metadata": {"name": "web", "namespace": ns}})
    base = "crash-cores-" + "b" * 49
    for bucket in (base + "-1", base + "-2"):
        out = kubectl(
            env, "enable", "web", "-n", ns, "--pattern", "/cores/core-%p", "--volume", f"s3fs:{bucket}:/prod"
        )
        assert out.returncode == 0, out.stderr
    pvs = {o["metadata"]["name"]: o for (res, _, _), o in fake.objects.items() if res == "persistentvolumes"}
    claims = [o for (res, _, _), o in fake.objects.items() if res == "persistentvolumeclaims"]
    assert len(pvs) == len(claims) == 2 and all(len(name) > 63 for name in pvs)
    for claim in claims:
        [(key, value)] = claim["spec"]["selector"]["matchLabels"].items()
        assert len(value) <= 63
        got = subprocess.run(
            ["kubectl", "get", "--raw", f"/api/v1/persistentvolumes?labelSelector={key}={value}"],
            capture_output=True, text=True, env=env, timeout=60, check=True,
        )  # fmt: skip
        [pv] = json.loads(got.stdout)["items"]
        assert pv["spec"]["claimRef"] == {"namespace": ns, "name": claim["metadata"]["name"]}


@pytest.mark.servers
def test_enable_with_an_s3fs_bucket_dry_run_prints_volume_claim_and_patch(kube) -> None:
    fake, env = kube
    fake.add("deployments", web_deployment())
    out = kubectl(
        env, "enable", "web", "--pattern", "/cores/core-%p", "--volume", "s3fs:crash-cores:/prod", "--dry-run"
    )
    assert out.returncode == 0, out.stderr
    decoder = json.JSONDecoder()
    listing, end = decoder.raw_decode(out.stdout)
    patch, _ = decoder.raw_decode(out.stdout[end:].lstrip())
    pv, pvc = listing["items"]
    assert pv["spec"]["csi"]["driver"] == "ru.yandex.s3.csi"
    assert pv["spec"]["csi"]["volumeHandle"] == "crash-cores/prod"
    assert pv["spec"]["csi"]["volumeAttributes"]["mounter"] == "s3fs"
    assert (
        patch["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"]
        == (pvc["metadata"]["name"])
    )
    assert not [r for r in fake.requests if r.method in ("POST", "PATCH")]


@pytest.mark.servers
def test_list_and_info_use_the_contexts_namespace(kube, tmp_path) -> None:
    from corevault import config
    from corevault.vault import catalog

    fake, env = kube
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'state_dir = "{tmp_path}/s"\n')
    engine = catalog.connect(config.load(str(cfg)).catalog_url)
    with engine.begin() as conn:
        for i, ns in enumerate(("shop", "billing")):
            meta = {"id": f"crash-{ns}", "time": 1700000000 + i, "pod": {"namespace": ns, "name": f"{ns}-0"}}
            catalog.add_crash(conn, meta, "off")
    env = {**env, "COREVAULT_CONFIG": str(cfg)}
    fake.kubeconfig(env["KUBECONFIG"], namespace="shop")
    listed = kubectl(env, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [json.loads(line)["id"] for line in listed.stdout.splitlines()] == ["crash-shop"]
    other = kubectl(env, "list", "--json", "-n", "billing")
    assert [json.loads(line)["id"] for line in other.stdout.splitlines()] == ["crash-billing"]
    assert "crash-shop" in kubectl(env, "info", "crash-shop").stdout
    missing = kubectl(env, "info", "no-such-crash")
    assert missing.returncode == 4 and missing.stderr.startswith(
        "kubectl corevault: error: no crash 'no-such-crash'"
    )


@pytest.mark.servers
def test_a_hostile_directory_is_quoted_not_run(kube) -> None:
    fake, env = kube
    evil = "/data/x;touch${IFS}pwned"
    fake.add("pods", seed_pod(annotations={"corevault.io/core-pattern": evil + "/core"}, mount=evil))
    out = kubectl(env, "debug", SEED_POD, "--no-attach")
    assert out.returncode == 0, out.stderr
    assert "sh -c 'cd '\"'\"'/data/x;touch${IFS}pwned'\"'\"' && exec sh'" in out.stdout
