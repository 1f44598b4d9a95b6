"""The image, run as deploy/ runs it: the rendered DaemonSet, server and webhook under podman.

Each workload is rendered by ``kubectl kustomize`` from an overlay over deploy/ that changes only
what an operator changes (the image, the vault in the ConfigMap, the S3 Secret; for pipe mode
the ``--install`` argument) plus, since pods here share the host's network ports, the
listening ports. :mod:`testbed.podspec` then runs the rendered container as a kubelet would.
The agent is pointed at the fake API server over TLS with a service account token, exactly
as in a cluster; its crashes come from real runc pods with kubepods cgroup paths, and its
vault is a real SeaweedFS and PostgreSQL.

The image is built once (``testbed.image.build``) and reused from podman's storage while its
inputs are unchanged; a cold build takes minutes, the tests themselves about a minute.
"""

from __future__ import annotations

import base64
import html
import json
import os
import shutil
import ssl
import subprocess
import tempfile
import urllib.request
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import sqlalchemy as sa
import yaml

from corevault import hostsetup
from corevault.capture.buildid import read_build_id
from corevault.vault import catalog
from testbed import image, podspec, runc, servers, sysctl, tls
from testbed.fakekube import FakeKube
from tests.conftest import starts_servers
from tests.test_podwatch import pod as pod_object
from tests.test_webhook import admit, seed_pod_without_a_volume
from tests.waiting import wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NODE = "node-image"
NAMESPACE = "shop"
READER_TOKEN = "reader-token-of-alice"
pytestmark = pytest.mark.crash  # the agent sets the host's core_pattern (under the host-wide lock)


# -- the cluster around the pods -------------------------------------------------------------


@dataclass
class Cluster:
    fake: FakeKube
    api: podspec.Api
    seaweed: servers.Seaweed
    pg: servers.Postgres
    dir: str
    tag: str

    def render(self, *patches: dict, catalog_url: str | None = None) -> list[dict]:
        """``kubectl kustomize`` of an overlay over deploy/ with this cluster's image and vault."""
        overlay = tempfile.mkdtemp(prefix="overlay-", dir=self.dir)
        pg_port = self.pg.port
        config = (
            'state_dir = "/var/lib/corevault"\n'
            f'[vault]\nstore = "s3://{self.seaweed.bucket}/image"\n'
            f'catalog = "{catalog_url or f"postgresql+psycopg://corevault@{podspec.HOST_FROM_POD}:{pg_port}/corevault"}"\n'
            f'[vault.s3]\nendpoint = "http://{podspec.HOST_FROM_POD}:{self.seaweed.s3_port}"\naddressing = "path"\n'
            # the readers (curl, gdb) run on the host, which does not reach the store at the
            # pods' address of it: the server streams binaries rather than redirect to it
            "redirect_downloads = false\n"
            '[agent]\nmetrics = "0.0.0.0:9464"\npoll_interval = 0.3\n'
        )
        kustomization = {
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "resources": [os.path.relpath(os.path.join(ROOT, "deploy"), overlay)],
            "images": [{"name": "registry.example/corevault", "newName": image.REPO,
                        "newTag": self.tag.rsplit(":", 1)[1]}],
            "patches": [
                {"patch": yaml.safe_dump({"apiVersion": "v1", "kind": "ConfigMap",
                                          "metadata": {"name": "corevault-config"},
                                          "data": {"config.toml": config}})},
                {"patch": yaml.safe_dump({"apiVersion": "v1", "kind": "Secret",
                                          "metadata": {"name": "corevault-s3"},
                                          "stringData": {"AWS_ACCESS_KEY_ID": servers.KEY,
                                                         "AWS_SECRET_ACCESS_KEY": servers.SECRET}})},
                *patches,
            ],
        }  # fmt: skip
        with open(os.path.join(overlay, "kustomization.yaml"), "w") as f:
            yaml.safe_dump(kustomization, f)
        out = subprocess.run(["kubectl", "kustomize", overlay], capture_output=True, text=True, check=True)
        return [d for d in yaml.safe_load_all(out.stdout) if d]

    def pod(self, docs: list[dict], kind: str, name: str) -> podspec.Pod:
        return podspec.Pod(docs, kind, name, self.tag, self.dir, api=self.api, node=NODE)

    def crashes(self) -> list[dict]:
        engine = sa.create_engine(self.pg.url)
        try:
            with engine.connect() as conn:
                return catalog.list_crashes(conn, limit=1000) if sa.inspect(conn).has_table("crashes") else []
        finally:
            engine.dispose()


def serve_tls(fake: FakeKube, cert: str, key: str) -> None:
    """The fake API server behind TLS, as in-cluster clients (https, the service account CA) need."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    assert fake.server is not None
    # the handshake happens in the request's thread, so a slow client holds up no other
    fake.server.socket = context.wrap_socket(
        fake.server.socket, server_side=True, do_handshake_on_connect=False
    )


@pytest.fixture(scope="module")
@starts_servers
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tag = image.build()
    d = str(tmp_path_factory.mktemp("cluster"))
    cert, key = tls.self_signed(d, podspec.HOST_FROM_POD)
    fake = FakeKube().start()
    serve_tls(fake, cert, key)
    assert fake.server is not None
    api = podspec.Api(fake.server.server_address[1], "service-account-token", cert)
    created_state = not os.path.exists("/var/lib/corevault")
    try:
        with servers.seaweed() as weed, servers.postgres() as pg:
            yield Cluster(fake, api, weed, pg, d, tag)
    finally:
        fake.stop()
        if created_state:
            shutil.rmtree("/var/lib/corevault", ignore_errors=True)


@pytest.fixture
def pods(cluster: Cluster) -> Iterator[list[podspec.Pod]]:
    """Every pod a test starts is removed after it, whatever happens."""
    started: list[podspec.Pod] = []
    yield started
    for p in started:
        p.remove()


def crash_in_a_pod(cluster: Cluster, rootfs: str, args: list[str], name: str) -> tuple[runc.Container, str]:
    """A runc pod that opted in crashes; returns the container and its volume."""
    volume = tempfile.mkdtemp(prefix="vol-", dir=cluster.dir)
    c = runc.Container(rootfs, args, volume=volume)
    cluster.fake.add("pods", {**pod_object(name, NODE, container_id=c.id, uid=c.pod_uid,
                                           annotations={"corevault.io/core-pattern": "/data/dump-a/core-%e-%p"})})  # fmt: skip
    index = f"/var/lib/corevault/pods/pods/{c.pod_uid}.json"  # the agent's pod index, from its watch
    wait_for(lambda: os.path.exists(index), "the agent's pod index to hold the pod", every=0.2)
    result = c.run()
    assert result.returncode != 0, result.stderr
    return c, volume


def shipped(cluster: Cluster, name: str) -> dict:
    """The crash of pod ``name`` in the vault's catalog, once shipped and analysed."""

    def find() -> dict | None:
        rows = [r for r in cluster.crashes() if r["pod"] == name]
        return rows[0] if rows and rows[0]["analysis"] not in ("pending", None) else None

    return wait_for(find, f"the crash of pod {name} in the catalog", timeout=90, every=0.2)  # type: ignore[return-value]


def events_for(cluster: Cluster, name: str) -> list[dict]:
    return [e for e in cluster.fake.events if e["involvedObject"]["name"] == name]


def install_arg_patch(cluster: Cluster, mode: str) -> dict:
    """A JSON patch of the DaemonSet's ``--install`` value, at its index in the rendered args."""
    [ds] = [d for d in cluster.render() if d["kind"] == "DaemonSet"]
    at = ds["spec"]["template"]["spec"]["containers"][0]["args"].index("--install") + 1
    return {
        "target": {"kind": "DaemonSet", "name": "corevault-agent"},
        "patch": json.dumps(
            [{"op": "replace", "path": f"/spec/template/spec/containers/0/args/{at}", "value": mode}]
        ),
    }


def assert_captured(cluster: Cluster, c: runc.Container, volume: str, name: str) -> dict:
    cores = wait_for(
        lambda: [f for f in os.listdir(volume) if f.startswith("core-crasher-")],
        "the core in the pod's volume",
        every=0.2,
    )
    assert len(cores) == 1, cores  # type: ignore[arg-type]
    row = shipped(cluster, name)
    assert (row["namespace"], row["pod"], row["node"]) == (NAMESPACE, name, NODE)
    assert row["analysis"] == "done" and "crash_here" in (row["title"] or ""), row
    wait_for(lambda: events_for(cluster, name), f"a CoreDumped Event for {name}", every=0.2)
    [event] = events_for(cluster, name)
    assert event["reason"] == "CoreDumped" and event["involvedObject"]["namespace"] == NAMESPACE
    assert os.listdir("/var/lib/corevault/spool/ready") == []  # shipped, so gone from the spool
    return row


# -- the agent -------------------------------------------------------------------------------


def test_the_daemonset_captures_in_socket_mode_and_a_replacement_takes_over_after_sigkill(
    cluster: Cluster, pods: list[podspec.Pod], rootfs: str
) -> None:
    docs = cluster.render()
    with sysctl.core_settings() as saved:
        agent = cluster.pod(docs, "DaemonSet", "corevault-agent")
        pods.append(agent.start())
        took = agent.wait_ready()
        print(f"agent ready {took:.1f} s after podman run")
        assert hostsetup.read_sysctls()["core_pattern"] == "@@/var/lib/corevault/coredump.sock"
        assert agent.probe("livenessProbe")[0] == 200 and agent.probe("startupProbe")[0] == 200

        c, volume = crash_in_a_pod(cluster, rootfs, ["/app/crasher", "segv"], "socket-pod")
        assert_captured(cluster, c, volume, "socket-pod")

        assert agent.kill() == 137  # SIGKILL: nothing restores the host; the pattern stays ours
        assert hostsetup.read_sysctls()["core_pattern"] == "@@/var/lib/corevault/coredump.sock"
        replacement = cluster.pod(docs, "DaemonSet", "corevault-agent")
        pods.append(replacement.start())
        replacement.wait_ready()  # listening again, and core_pattern still (again) corevault's
        c, volume = crash_in_a_pod(cluster, rootfs, ["/app/crasher", "segv"], "after-restart")
        assert_captured(cluster, c, volume, "after-restart")

        assert replacement.stop() == 0  # SIGTERM: the host's own settings, saved by the first agent
        assert hostsetup.read_sysctls() == saved
        assert not os.path.exists("/var/lib/corevault/installed.json")


def test_the_daemonset_captures_in_pipe_mode_through_the_forwarder_it_copied_out(
    cluster: Cluster, pods: list[podspec.Pod], rootfs: str
) -> None:
    docs = cluster.render(install_arg_patch(cluster, "pipe"))
    with sysctl.core_settings() as saved:
        agent = cluster.pod(docs, "DaemonSet", "corevault-agent")
        pods.append(agent.start())
        agent.wait_ready()
        forwarder, sock = hostsetup.forwarder_paths("/var/lib/corevault")
        assert hostsetup.read_sysctls()["core_pattern"].startswith(f"|{forwarder} {sock} %P ")
        with open(forwarder, "rb") as f:  # the image's static forwarder, runnable from the host's root
            assert f.read(4) == b"\x7fELF"
        c, volume = crash_in_a_pod(cluster, rootfs, ["/app/crasher", "segv"], "pipe-pod")
        assert_captured(cluster, c, volume, "pipe-pod")
        assert agent.stop() == 0
        assert hostsetup.read_sysctls() == saved


def debuginfo_bomb(src: str, dest: str, expands_to: int = 1 << 30) -> str:
    """``src`` with a .zdebug_info section of zeros that inflates to ``expands_to`` bytes.

    A container controls its binaries; this is the cheapest way to make an unwinder that
    reads the executable's DWARF ask for more memory than the agent's container has.
    """
    blob = dest + ".zdebug"
    z = zlib.compressobj(9)
    chunk = bytes(64 << 20)
    with open(blob, "wb") as f:
        f.write(b"ZLIB" + expands_to.to_bytes(8, "big"))
        for _ in range(expands_to // len(chunk)):
            f.write(z.compress(chunk))
        f.write(z.flush())
    subprocess.run(
        ["objcopy", "--remove-section", ".debug_info", "--add-section", f".zdebug_info={blob}", src, dest],
        check=True,
    )
    os.unlink(blob)
    with open(dest, "rb") as f:  # a build-id of its own, or the vault serves the clean binary's copy
        data = f.read()
    fd = os.open(dest, os.O_RDONLY)
    try:
        old = read_build_id(fd)
    finally:
        os.close(fd)
    assert old and data.count(bytes.fromhex(old)) == 1
    with open(dest, "wb") as f:
        f.write(data.replace(bytes.fromhex(old), os.urandom(len(old) // 2)))
    return dest


def test_an_analysis_over_the_memory_limit_does_not_take_the_agent_down(
    cluster: Cluster, pods: list[podspec.Pod], rootfs: str, tmp_path
) -> None:
    docs = cluster.render()
    [ds] = [d for d in docs if d["kind"] == "DaemonSet"]
    limit = podspec.quantity(ds["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"])
    bombed = str(tmp_path / "root")
    shutil.copytree(rootfs, bombed, symlinks=True)
    debuginfo_bomb(
        os.path.join(rootfs, "app/crasher"), os.path.join(bombed, "app/bomb"), expands_to=2 * limit
    )
    with sysctl.core_settings() as saved:
        agent = cluster.pod(docs, "DaemonSet", "corevault-agent")
        pods.append(agent.start())
        agent.wait_ready()
        c, volume = crash_in_a_pod(cluster, bombed, ["/app/bomb", "segv"], "bomb-pod")
        row = shipped(cluster, "bomb-pod")
        assert row["analysis"] == "failed", row  # the analysis could not be done within the limit ...
        assert agent.oom_killed()  # ... the kernel killed a process in the agent's pod for memory ...
        assert agent.running() and agent.probe("livenessProbe")[0] == 200  # ... and the agent lives on
        c, volume = crash_in_a_pod(cluster, rootfs, ["/app/crasher", "segv"], "after-bomb")
        assert_captured(cluster, c, volume, "after-bomb")
        assert agent.stop() == 0
        assert hostsetup.read_sysctls() == saved


# -- the server and the webhook ----------------------------------------------------------------


def test_the_server_deployment_serves_the_ui_api_and_debuginfod_to_gdb(
    cluster: Cluster, pods: list[podspec.Pod], tmp_path
) -> None:
    rows = cluster.crashes()
    assert rows, "the agent tests above put no crash into the vault"
    crash = rows[0]
    cluster.fake.users[READER_TOKEN] = ("alice", [])
    cluster.fake.grants.add(("alice", "get", "pods", NAMESPACE))
    server = cluster.pod(cluster.render(), "Deployment", "corevault-server")
    pods.append(server.start())
    server.wait_ready()
    assert server.probe("livenessProbe")[0] == 200
    url = f"http://127.0.0.1:{server.ports['http']}"
    auth = {"Authorization": f"Bearer {READER_TOKEN}"}

    def get(path: str) -> bytes:
        with urllib.request.urlopen(urllib.request.Request(url + path, headers=auth), timeout=30) as r:  # noqa: S310
            return r.read()

    page = html.unescape(get("/").decode())
    assert crash["title"] and crash["title"] in page, page[:2000]  # the crash's group, on the reader's page
    listed = json.loads(get("/api/v1/crashes"))
    assert crash["id"] in json.dumps(listed)
    core = tmp_path / "core"
    core.write_bytes(get(f"/api/v1/crashes/{crash['id']}/core"))
    headers = tmp_path / "headers"
    headers.write_text(f"Authorization: Bearer {READER_TOKEN}\n")
    env = {**os.environ, "DEBUGINFOD_URLS": url, "DEBUGINFOD_HEADERS_FILE": str(headers),
           "DEBUGINFOD_CACHE_PATH": str(tmp_path / "cache"), "DEBUGINFOD_TIMEOUT": "30"}  # fmt: skip
    gdb = subprocess.run(
        ["gdb", "-batch", "-nx", "-iex", "set debuginfod enabled on", "-ex", "bt", "-c", str(core)],
        capture_output=True, text=True, env=env, timeout=300, check=False, cwd=tmp_path,
    )  # fmt: skip
    frames = [line for line in gdb.stdout.splitlines() if line.startswith("#")]
    assert any(" crash_here (" in f for f in frames), gdb.stdout + gdb.stderr  # symbols from the server alone


def test_the_webhook_deployment_manages_its_tls_and_answers_admission_reviews(
    cluster: Cluster, pods: list[podspec.Pod]
) -> None:
    docs = cluster.render()
    [mwc] = [d for d in docs if d["kind"] == "MutatingWebhookConfiguration"]
    cluster.fake.objects[("mutatingwebhookconfigurations", "", "corevault")] = json.loads(json.dumps(mwc))
    webhook = cluster.pod(docs, "Deployment", "corevault-webhook")
    pods.append(webhook.start())
    webhook.wait_ready()
    secret = cluster.fake.get("secrets", "corevault", "corevault-webhook-tls")
    ca = base64.b64decode(secret["data"]["ca.crt"]).decode()
    published = cluster.fake.get("mutatingwebhookconfigurations", "", "corevault")
    assert base64.b64decode(published["webhooks"][0]["clientConfig"]["caBundle"]).decode() == ca
    context = ssl.create_default_context(cadata=ca)
    context.check_hostname = False  # the certificate names the Service; the test dials 127.0.0.1
    response = admit(
        (f"https://127.0.0.1:{webhook.ports['https']}/mutate", context), seed_pod_without_a_volume()
    )
    assert response["allowed"] is True and "patch" in response
