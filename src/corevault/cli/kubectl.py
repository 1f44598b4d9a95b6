"""``kubectl corevault``: the kubectl plugin (an executable named kubectl-corevault on PATH).

It talks to the cluster of the current kubectl context with the official Python client;
``kubectl exec`` does the attaching. ``list`` and ``info`` are corevault's own, scoped to
the context's namespace.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import sys

import typer

from corevault.cli import app as corevault_app
from corevault.cli import exits
from corevault.errors import UserError
from corevault.printable import printable

STRATEGIC = "application/strategic-merge-patch+json"

app = typer.Typer(
    name="kubectl corevault",
    help="Core dumps of your pods: reach them in an ephemeral container, enable them on a workload.",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _client(context: str | None):  # -> (CoreV1Api, AppsV1Api, namespace)
    from kubernetes import client, config
    from kubernetes.config.config_exception import ConfigException

    try:
        config.load_kube_config(context=context)
        _, active = config.list_kube_config_contexts()
    except (ConfigException, OSError) as e:
        raise UserError(
            f"no usable kubeconfig ({e}); set KUBECONFIG or run 'kubectl config use-context'"
        ) from None
    namespace = (active or {}).get("context", {}).get("namespace") or "default"
    return client.CoreV1Api(), client.AppsV1Api(), namespace


def _call(
    fn, verb: str, resource: str, namespace: str, *args: object, name: str | None = None, **kw: object
) -> dict:
    """``fn(*args)``'s answer; ``name``: the object a get names, for a 404 that says which is missing."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    from corevault.kube.debug import explain

    try:
        response = fn(*args, _preload_content=False, **kw)
    except ApiException as e:
        raise explain(e.status, e.reason or "", verb, resource, namespace, name=name) from None
    except HTTPError as e:
        # urllib3 nests the cause in a retry error's repr; the errno's words are what a person needs
        text = str(getattr(e, "reason", None) or e)
        cause = re.search(r"\[Errno -?\d+\] [^\"')]+", text)
        host = client.Configuration.get_default_copy().host
        raise UserError(
            f"cannot reach the API server at {host}: {cause.group(0) if cause else text}; "
            "check the kubeconfig's server and that the cluster is up"
        ) from None
    return json.loads(response.data or b"{}")


@app.command(epilog="Example: kubectl corevault debug coredump-emptydir-volume-test-7c9d8 -c nginx")
def debug(
    pod: str = typer.Argument(..., help="The pod whose cores to reach."),
    container: str = typer.Option(
        None, "-c", "--container", help="The pod's container [default: its first]."
    ),
    namespace: str = typer.Option(None, "-n", "--namespace", help="Namespace [default: the context's]."),
    image: str = typer.Option(None, help="Image of the debug container [default: the target container's]."),
    command: list[str] = typer.Option(None, "--command", help="Command of the debug container."),
    gdb: bool = typer.Option(False, "--gdb", help="Start gdb on the newest core instead of a shell."),
    attach: bool = typer.Option(True, "--attach/--no-attach", help="Attach once it runs, or print how to."),
    timeout: float = typer.Option(120, min=0.001, help="Seconds to wait for the debug container to run."),
    context: str = typer.Option(None, help="kubeconfig context [default: the current one]."),
) -> None:
    """Add an ephemeral container that mounts the pod's core volume, then open a shell there."""
    from corevault.kube import debug as dbg

    core, _, current = _client(context)
    ns = namespace or current
    found = _call(core.read_namespaced_pod, "get", "pods", ns, pod, ns, name=pod)
    target = dbg.find_target(found, container)
    chosen = next(c for c in found["spec"]["containers"] if c["name"] == target.container)
    spec = dbg.ephemeral_container(target, image or chosen.get("image", "busybox"), command)
    body = {"spec": {"ephemeralContainers": [spec]}}
    _call(
        core.patch_namespaced_pod_ephemeralcontainers, "patch", "pods/ephemeralcontainers", ns, pod, ns, body,
        _content_type=STRATEGIC,
    )  # fmt: skip
    print(
        f"added debug container {spec['name']} mounting {target.volume} at {target.directory}",
        file=sys.stderr,
    )
    dbg.wait_running(
        lambda: _call(core.read_namespaced_pod, "get", "pods", ns, pod, ns, name=pod), spec["name"], timeout
    )
    cmd = dbg.shell_command(target, spec["name"], gdb)
    if not attach:
        print(shlex.join(cmd))
        return
    os.execvp(cmd[0], cmd)  # noqa: S606 - hands the terminal to kubectl exec


@app.command(
    epilog="Example: kubectl corevault enable deployment/checkout --pattern '/data/dump-a/core-%E-%p-%t'"
)
def enable(
    workload: str = typer.Argument(
        ..., help="deployment/NAME, statefulset/NAME or daemonset/NAME (NAME: a deployment)."
    ),
    pattern_: str = typer.Option(..., "--pattern", help="Where cores go in the pod, a core(5) pattern."),
    volume: str = typer.Option(
        "emptydir",
        help="emptydir, pvc:CLAIM, nfs:SERVER:/PATH, or a bucket: oss:BUCKET[:/PATH], s3fs:BUCKET[:/PATH].",
    ),
    endpoint: str = typer.Option(
        None, help="The bucket's endpoint (oss), e.g. oss-cn-hangzhou-internal.aliyuncs.com."
    ),
    secret: str = typer.Option(
        None, help="Secret with the bucket's credentials [default: the CSI driver's usual]."
    ),
    namespace: str = typer.Option(None, "-n", "--namespace", help="Namespace [default: the context's]."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the patch; change nothing."),
    context: str = typer.Option(None, help="kubeconfig context [default: the current one]."),
) -> None:
    """Add the core-pattern annotation and a volume at the pattern's directory to a workload.

    A bucket volume is a PersistentVolume of the bucket's FUSE CSI driver and its claim, as
    in the OSS example of ACS; both are created when missing.
    """
    from corevault.kube import buckets
    from corevault.kube import debug as dbg

    kind, _, name = workload.partition("/") if "/" in workload else ("deployment", "", workload)
    kind = kind.lower().removesuffix("s")
    if kind not in dbg.KINDS or not name:
        raise typer.BadParameter(f"{workload!r}: use deployment/NAME, statefulset/NAME or daemonset/NAME")
    bucket = buckets.parse(volume)
    core, apps, current = _client(context)
    ns = namespace or current
    claim = buckets.objects(bucket, ns, endpoint=endpoint, secret=secret) if bucket else []
    read = getattr(apps, f"read_namespaced_{kind}")
    patch_fn = getattr(apps, f"patch_namespaced_{kind}")
    resource = dbg.KINDS[kind]
    current_obj = _call(read, "get", resource, ns, name, ns, name=name)
    patch = dbg.enable_patch(kind, current_obj["spec"]["template"], pattern_, volume)
    if dry_run:
        if claim:
            print(json.dumps({"apiVersion": "v1", "kind": "List", "items": claim}, indent=2))
        print(json.dumps(patch, indent=2))
        return
    for obj in claim:
        _create_missing(core, obj)
    _call(patch_fn, "patch", resource, ns, name, ns, patch, _content_type=STRATEGIC)
    print(f"{kind}/{name}: cores now go to {pattern_} on a {volume} volume")


def _create_missing(core, obj: dict) -> None:
    """Create a PersistentVolume or PersistentVolumeClaim unless one of that name exists."""
    from kubernetes.client.exceptions import ApiException

    from corevault.kube.debug import explain

    name, ns = obj["metadata"]["name"], obj["metadata"].get("namespace")
    if ns is None:
        read, create, resource, args = (
            core.read_persistent_volume, core.create_persistent_volume, "persistentvolumes", (),
        )  # fmt: skip
    else:
        read, create, resource, args = (
            core.read_namespaced_persistent_volume_claim, core.create_namespaced_persistent_volume_claim,
            "persistentvolumeclaims", (ns,),
        )  # fmt: skip
    where = ns or "(the cluster)"
    try:
        read(name, *args, _preload_content=False)
        return
    except ApiException as e:
        if e.status != 404:
            raise explain(e.status, e.reason or "", "get", resource, where) from None
    _call(create, "create", resource, where, *args, obj)


@app.command(
    epilog="Example: kubectl corevault snapshot checkout-7d9f -c app --reason 'requests hang since 03:10'"
)
def snapshot(
    pod: str = typer.Argument(..., help="The pod whose live process to snapshot."),
    container: str = typer.Option(None, "-c", "--container", help="The pod's container."),
    namespace: str = typer.Option(None, "-n", "--namespace", help="Namespace [default: the context's]."),
    kill: bool = typer.Option(False, "--kill", help="Kill the process once its core is kept."),
    reason: str = typer.Option("", "--reason", help="Why, for the report."),
    server: str = typer.Option(
        None, "--server", envvar="COREVAULT_SERVER", help="The corevault server's URL."
    ),
    wait: float = typer.Option(120, min=0.001, help="Seconds to wait for the node to answer."),
    context: str = typer.Option(None, help="kubeconfig context [default: the current one]."),
) -> None:
    """A core of a pod's running process, taken on its node and kept like a crash; the process goes on.

    Allowed to whoever may exec into the pod: the corevault server asks the API server.
    """
    import time

    from corevault.vault.remote import RemoteVault

    if not server:
        raise UserError("set COREVAULT_SERVER (or --server) to the corevault server's URL")
    core, _, current = _client(context)
    ns = namespace or current
    _call(
        core.read_namespaced_pod, "get", "pods", ns, pod, ns, name=pod
    )  # a clear error for a pod that is not there
    token = os.environ.get("COREVAULT_TOKEN") or _kube_token()
    remote = RemoteVault(server, token)
    status = remote.request_snapshot(ns, pod, container, kill=kill, reason=reason)
    deadline = time.monotonic() + wait
    while status["state"] in ("pending", "running") and time.monotonic() < deadline:
        time.sleep(0.5)
        status = remote.snapshot_status(status["id"])
    if status["state"] in ("pending", "running"):
        raise UserError(f"no answer from the node within {wait:g}s; ask again later: {status['id']}")
    if status["state"] != "done":
        raise UserError(f"snapshot of {ns}/{pod} {status['state']}: {status['error']}")
    print(f"snapshot of {ns}/{pod} taken on node {status['node']}" + (", then killed" if kill else ""))
    if status["volume"]:
        # the path holds what the pattern expanded in it: the process's name (%e), its executable (%E)
        where = printable(status["volume"])
        print(f"  core in the pod: {where}  (kubectl corevault debug {pod} -n {ns} to reach it)")
    print(f"  crash {status['crash_id']}: kubectl corevault info {status['crash_id']} once it is analysed")


def _kube_token() -> str | None:
    """The bearer token of the kubeconfig's user, which the corevault server reviews with the API server."""
    from kubernetes import client

    keys = client.Configuration.get_default_copy().api_key
    auth = keys.get("BearerToken") or keys.get("authorization") or ""
    return auth.removeprefix("Bearer ").strip() or None


@app.command("list", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def list_(ctx: typer.Context, namespace: str = typer.Option(None, "-n", "--namespace")) -> None:
    """corevault list, for the namespace of the current context (other options pass through)."""
    ns = namespace or _client(None)[2]
    raise typer.Exit(
        exits.run(corevault_app.app, ["list", "--namespace", ns, *ctx.args], "kubectl corevault")
    )


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def info(ctx: typer.Context) -> None:
    """corevault info ID."""
    raise typer.Exit(exits.run(corevault_app.app, ["info", *ctx.args], "kubectl corevault"))


def main(argv: list[str] | None = None) -> int:
    return exits.run(app, argv, "kubectl corevault")


if __name__ == "__main__":
    sys.exit(main())
