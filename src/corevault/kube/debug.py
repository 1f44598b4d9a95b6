"""Reaching a pod's cores from kubectl: ephemeral debug containers and enabling workloads.

``debug`` does in one step what ACS's guide does by hand with ``kubectl proxy`` and
``curl``: it reads the pod's core-pattern annotation, finds the volume mounted at the
pattern's directory, and adds an ephemeral container that mounts the same volume at the
same path (a PATCH of the ``pods/{name}/ephemeralcontainers`` subresource, strategic
merge, as the guide sends), with ``targetContainerName`` set. Ephemeral containers can be
neither removed nor renamed, so each attempt gets a fresh name.

``enable`` adds the annotation, a volume and a mount at the pattern's directory to a
workload's pod template.
"""

from __future__ import annotations

import os
import shlex
import time
from dataclasses import dataclass

from corevault import pattern, podannotations
from corevault.errors import UserError
from corevault.kube import volumes
from corevault.kube.volumes import mount_for

KINDS = {"deployment": "deployments", "statefulset": "statefulsets", "daemonset": "daemonsets"}


class KubeError(UserError):
    """The API server said no, or the pod cannot be debugged this way; the message says why."""


def explain(
    status: int, reason: str, verb: str, resource: str, namespace: str, *, name: str | None = None
) -> KubeError:
    if status == 404 and verb == "get" and name is not None:  # a mistyped name, the wrong namespace
        return KubeError(
            f"no {resource.removesuffix('s')} {name!r} in namespace {namespace}; "
            f"'kubectl get {resource} -n {namespace}' lists them (-n picks another namespace)"
        )
    if status == 403:
        return KubeError(
            f"forbidden: you may not {verb} {resource} in namespace {namespace}; "
            f"ask for a Role with verbs [{verb}] on resources [{resource}]"
        )
    if status == 404 and resource.endswith("/ephemeralcontainers"):
        return KubeError("this cluster has no ephemeral containers (Kubernetes 1.23 or newer is needed)")
    return KubeError(f"the API server refused to {verb} {resource}: {status} {reason}")


@dataclass(frozen=True)
class Target:
    namespace: str
    pod: str
    container: str
    pattern: str
    directory: str
    volume: str


def find_target(pod: dict, container: str | None) -> Target:
    """Where a pod's cores go and which volume holds them, or a clear error."""
    meta, spec = pod.get("metadata", {}), pod.get("spec", {})
    name, namespace = meta.get("name"), meta.get("namespace", "default")
    annotations = meta.get("annotations") or {}
    asked = podannotations.core_pattern(annotations)
    if asked is None:
        raise KubeError(
            f"pod {namespace}/{name} has no {podannotations.PATTERN} or {podannotations.PATTERN_ACS} "
            "annotation; 'kubectl corevault enable' adds one to its workload"
        )
    _, pat = asked
    phase = (pod.get("status") or {}).get("phase")
    if phase in ("Succeeded", "Failed"):
        raise KubeError(f"pod {namespace}/{name} has terminated ({phase}); no container can be added to it")
    containers = spec.get("containers") or []
    if container is None:
        if not containers:
            raise KubeError(f"pod {namespace}/{name} has no containers")
        chosen = containers[0]
    else:
        chosen = next((c for c in containers if c.get("name") == container), None)
        if chosen is None:
            names = ", ".join(c.get("name", "?") for c in containers)
            raise KubeError(f"pod {namespace}/{name} has no container {container!r} (it has: {names})")
    directory = pattern.directory(pat)
    mount = mount_for(chosen, directory)
    if mount is None:
        raise KubeError(
            f"no volume is mounted at {directory} in container {chosen['name']} of {namespace}/{name}: "
            f"cores written there stay in the container's root; mount a volume at {directory}"
        )
    return Target(namespace, name, chosen["name"], pat, directory, mount)


def ephemeral_container(target: Target, image: str, command: list[str] | None) -> dict:
    """The ephemeral container the guide builds by hand, with a name never used before."""
    return {
        "name": f"corevault-debug-{os.urandom(3).hex()}",
        "image": image,
        "command": command or ["sh", "-c", "sleep 3600"],
        "stdin": True,
        "tty": True,
        "targetContainerName": target.container,
        "volumeMounts": [{"name": target.volume, "mountPath": target.directory.rstrip("/") + "/"}],
    }


def wait_running(read_pod, name: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        pod = read_pod()
        for st in (pod.get("status") or {}).get("ephemeralContainerStatuses") or []:
            if st.get("name") == name:
                state = st.get("state") or {}
                if "running" in state:
                    return
                waiting = state.get("waiting") or {}
                if waiting.get("reason") in ("ErrImagePull", "ImagePullBackOff", "InvalidImageName"):
                    why = f"{waiting['reason']}: {waiting.get('message', '')}"
                    raise KubeError(f"debug container {name} cannot start: {why}")
                if "terminated" in state:
                    raise KubeError(f"debug container {name} exited: {state['terminated'].get('reason', '')}")
        if time.monotonic() > deadline:
            raise KubeError(f"debug container {name} did not start within {timeout:g}s")
        time.sleep(0.5)


def shell_command(target: Target, name: str, gdb: bool) -> list[str]:
    """The kubectl command that lands in the cores' directory (or gdb on the newest core).

    The directory comes from a pod annotation: it is quoted, never interpreted by the shell.
    gdb starts in that directory, which the pod writes: with ``-nx`` and auto-loading off, as
    corevault's own gdb runs, it reads no ``.gdbinit`` (neither the directory's nor the debug
    image's, which may widen gdb's ``auto-load safe-path``) and loads no script a binary names.
    """
    where = shlex.quote(target.directory)
    inner = f"cd {where} && exec sh"
    if gdb:
        inner = (
            f"cd {where} && core=$(ls -t | head -n 1) && "
            "exec gdb -q -nx -iex 'set auto-load off' -c \"$core\""
        )
    return ["kubectl", "exec", "-it", "-n", target.namespace, target.pod, "-c", name, "--", "sh", "-c", inner]


def enable_patch(kind: str, template: dict, pat: str, volume: str) -> dict:
    """A strategic-merge patch adding the annotation, a volume and a mount at the pattern's directory."""
    pattern.check(pat)
    directory = pattern.directory(pat)
    spec = template.get("spec") or {}
    containers = spec.get("containers") or []
    if not containers:
        raise KubeError(f"the {kind} has no containers in its pod template")
    patch_containers = []
    for c in containers:
        if mount_for(c, directory) is None:
            patch_containers.append(
                {"name": c["name"], "volumeMounts": [{"name": volumes.VOLUME_NAME, "mountPath": directory}]}
            )
    patch: dict = {"spec": {"template": {"metadata": {"annotations": {podannotations.PATTERN: pat}}}}}
    if patch_containers:
        patch["spec"]["template"]["spec"] = {
            "containers": patch_containers,
            "volumes": [volumes.volume_source(volume)],
        }
    return patch
