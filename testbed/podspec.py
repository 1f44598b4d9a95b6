"""A rendered pod template, run by podman the way a kubelet runs it, on one machine.

Everything comes from the objects ``kubectl kustomize`` rendered, not from a copy in a test:
the container's image, command and args; env (values, ``fieldRef`` to the node name, the
pod's namespace and name, ``envFrom`` a rendered Secret); ``resources.limits.memory``; the
securityContext (privileged, runAsUser, runAsNonRoot, readOnlyRootFilesystem, capabilities,
allowPrivilegeEscalation); ``hostPID``; volumes (a ConfigMap as read-only files, hostPath with
its ``type`` and ``mountPropagation``, emptyDir on disk or in memory, world-writable as the
kubelet makes it); the service account's token and CA at the usual path with
``KUBERNETES_SERVICE_HOST``/``PORT``; ``terminationGracePeriodSeconds`` on stop; and httpGet
probes against the named container ports.

What differs from a node: there is no CNI here. The pod gets a network namespace of its own
from slirp4netns, in which the host's loopback is ``10.0.2.2`` (how it reaches the fake API
server and the test's vault, which listen on 127.0.0.1 only), and its container ports are
published on the host's 127.0.0.1 (how the probes reach it, as a kubelet reaches the pod IP).
Containers are removed by :meth:`Pod.remove`, which the tests call on every way out.
"""

from __future__ import annotations

import base64
import json
import os
import ssl
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field

from testbed import image, servers

HOST_FROM_POD = "10.0.2.2"
SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
UNITS = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "K": 10**3, "M": 10**6, "G": 10**9}


def quantity(value: str | int) -> int:
    """Bytes in a Kubernetes memory quantity (``512Mi``, ``1G``, ``1048576``)."""
    text = str(value)
    for suffix, factor in UNITS.items():
        if text.endswith(suffix):
            return int(float(text[: -len(suffix)]) * factor)
    return int(text)


@dataclass
class Api:
    """How pods reach the API server: its port on the host's loopback, a token and the CA."""

    port: int
    token: str
    ca: str


def find(docs: list[dict], kind: str, name: str) -> dict:
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


@dataclass
class Pod:
    """The pod of a rendered workload (``kind``/``name``), its first container run with podman."""

    docs: list[dict]
    kind: str
    name: str
    image: str
    workdir: str
    api: Api | None = None
    node: str = "node-1"
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:10])
    ports: dict[str, int] = field(default_factory=dict)  # container port name -> host port
    started: float = 0.0

    @property
    def workload(self) -> dict:
        return find(self.docs, self.kind, self.name)

    @property
    def spec(self) -> dict:
        return self.workload["spec"]["template"]["spec"]

    @property
    def container(self) -> dict:
        return self.spec["containers"][0]

    @property
    def namespace(self) -> str:
        return self.workload["metadata"].get("namespace", "default")

    @property
    def podman_name(self) -> str:
        return f"cv-{self.name}-{self.id}"

    def _env(self) -> list[str]:
        fields = {"spec.nodeName": self.node, "metadata.namespace": self.namespace,
                  "metadata.name": f"{self.name}-{self.id}"}  # fmt: skip
        env: dict[str, str] = {}
        for source in self.container.get("envFrom", []):
            secret = find(self.docs, "Secret", source["secretRef"]["name"])
            env |= {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}
            env |= secret.get("stringData") or {}
        for var in self.container.get("env", []):
            if "value" in var:
                env[var["name"]] = var["value"]
            else:
                env[var["name"]] = fields[var["valueFrom"]["fieldRef"]["fieldPath"]]
        if self.api is not None:
            env |= {"KUBERNETES_SERVICE_HOST": HOST_FROM_POD, "KUBERNETES_SERVICE_PORT": str(self.api.port)}
        return [f"-e{k}={v}" for k, v in env.items()]

    def _volumes(self) -> list[str]:
        opts = []
        volumes = {v["name"]: v for v in self.spec.get("volumes", [])}
        for mount in self.container.get("volumeMounts", []):
            vol, dest = volumes[mount["name"]], mount["mountPath"]
            ro = ",ro" if mount.get("readOnly") else ""
            if "configMap" in vol:
                data = find(self.docs, "ConfigMap", vol["configMap"]["name"])["data"]
                d = os.path.join(self.workdir, f"cm-{mount['name']}-{self.id}")
                os.makedirs(d, exist_ok=True)
                for key, text in data.items():
                    with open(os.path.join(d, key), "w") as f:
                        f.write(text)
                opts += ["-v", f"{d}:{dest}:ro"]
            elif "hostPath" in vol:
                path, kind = vol["hostPath"]["path"], vol["hostPath"].get("type", "")
                if kind == "DirectoryOrCreate":
                    os.makedirs(path, mode=0o755, exist_ok=True)
                elif kind == "Directory" and not os.path.isdir(path):
                    raise RuntimeError(f"hostPath {path} is no directory: a kubelet would not start the pod")
                propagation = {"HostToContainer": ",rslave", "Bidirectional": ",rshared"}.get(
                    mount.get("mountPropagation", ""), ""
                )
                opts += ["-v", f"{path}:{dest}:rbind{ro}{propagation}"]
            elif "emptyDir" in vol:
                if vol["emptyDir"].get("medium") == "Memory":
                    opts += ["--tmpfs", f"{dest}:rw,mode=1777"]
                else:
                    d = os.path.join(self.workdir, f"empty-{mount['name']}-{self.id}")
                    os.makedirs(d, exist_ok=True)
                    os.chmod(d, 0o777)  # noqa: S103 - a kubelet's emptyDir: writable whatever the pod's user
                    opts += ["-v", f"{d}:{dest}:rw"]
            else:
                raise RuntimeError(f"volume {mount['name']}: this runner knows configMap, hostPath, emptyDir")
        if self.api is not None and self.spec.get("automountServiceAccountToken", True):
            d = os.path.join(self.workdir, f"sa-{self.id}")
            os.makedirs(d, exist_ok=True)
            for key, text in (("token", self.api.token), ("namespace", self.namespace)):
                with open(os.path.join(d, key), "w") as f:
                    f.write(text)
            with open(self.api.ca) as src, open(os.path.join(d, "ca.crt"), "w") as f:
                f.write(src.read())
            os.chmod(d, 0o755)  # noqa: S103 - readable by the pod's user, as a kubelet mounts it
            for key in ("token", "namespace", "ca.crt"):
                os.chmod(os.path.join(d, key), 0o644)
            opts += ["-v", f"{d}:{SA_DIR}:ro"]
        return opts

    def _security(self) -> list[str]:
        pod_sc = self.spec.get("securityContext") or {}
        sc = self.container.get("securityContext") or {}
        opts = []
        if self.spec.get("hostPID"):
            opts += ["--pid", "host"]
        if sc.get("privileged"):
            opts.append("--privileged")
        user = sc.get("runAsUser", pod_sc.get("runAsUser"))
        if user is not None:
            opts += ["--user", f"{user}:{sc.get('runAsGroup', pod_sc.get('runAsGroup', user))}"]
        if sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) and not user:
            raise RuntimeError("runAsNonRoot without runAsUser: a kubelet refuses an image that runs as root")
        if sc.get("readOnlyRootFilesystem"):
            opts.append("--read-only")
        caps = sc.get("capabilities") or {}
        opts += [f"--cap-drop={c}" for c in caps.get("drop", [])]
        opts += [f"--cap-add={c}" for c in caps.get("add", [])]
        if sc.get("allowPrivilegeEscalation") is False:
            opts += ["--security-opt", "no-new-privileges"]
        return opts

    def _resources(self) -> list[str]:
        limit = (self.container.get("resources") or {}).get("limits", {}).get("memory")
        return ["--memory", str(quantity(limit)), "--memory-swap", str(quantity(limit))] if limit else []

    def _ports(self) -> list[str]:
        opts = []
        for port in self.container.get("ports", []):
            host = servers.free_port()
            self.ports[port["name"]] = host
            opts += ["-p", f"127.0.0.1:{host}:{port['containerPort']}"]
        return opts

    def start(self) -> Pod:
        cmd = [
            "podman", "run", "-d", "--pull=never", "--name", self.podman_name, *image.ulimits(),
            "--network", "slirp4netns:allow_host_loopback=true", "--hostname", f"{self.name}-{self.id}",
            *self._env(), *self._volumes(), *self._security(), *self._resources(), *self._ports(),
        ]  # fmt: skip
        if self.container.get("command"):
            cmd += ["--entrypoint", json.dumps(self.container["command"])]
        cmd += [self.image, *self.container.get("args", [])]
        self.started = time.monotonic()
        # in the pod's own directory: podman's conmon drops an "oom" file into its working directory
        # when the container's memory limit kills a process (see oom_killed)
        os.makedirs(self.rundir, exist_ok=True)
        subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=self.rundir)
        return self

    @property
    def rundir(self) -> str:
        return os.path.join(self.workdir, f"pod-{self.id}")

    def oom_killed(self) -> bool:
        """Whether the container's memory limit killed one of its processes (conmon's marker)."""
        return os.path.exists(os.path.join(self.rundir, "oom"))

    def running(self) -> bool:
        out = subprocess.run(
            ["podman", "inspect", "--format", "{{.State.Running}}", self.podman_name],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        return out.stdout.strip() == "true"

    def logs(self) -> str:
        out = subprocess.run(
            ["podman", "logs", self.podman_name], capture_output=True, text=True, check=False
        )
        return out.stdout + out.stderr

    def probe(self, which: str) -> tuple[int, str]:
        """Run the container's ``readinessProbe``/``livenessProbe``/``startupProbe`` once: (status, body)."""
        get = self.container[which]["httpGet"]
        port = get["port"]
        if isinstance(port, str):
            host_port = self.ports[port]
        else:
            named = {p["containerPort"]: p["name"] for p in self.container["ports"]}
            host_port = self.ports[named[port]]
        url = f"{get.get('scheme', 'HTTP').lower()}://127.0.0.1:{host_port}{get['path']}"
        context = ssl._create_unverified_context()  # noqa: S323 - the kubelet does not verify probes either
        try:
            with urllib.request.urlopen(url, timeout=5, context=context) as r:  # noqa: S310
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()
        except OSError as e:
            return 0, str(e)

    def wait_ready(self, timeout: float = 120) -> float:
        """Probe readiness until it passes; returns the seconds since start. Fails if the pod exits."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status, body = self.probe("readinessProbe")
            if status == 200:
                return time.monotonic() - self.started
            if not self.running():
                raise RuntimeError(f"{self.podman_name} exited before it was ready:\n{self.logs()}")
            time.sleep(0.2)
        raise TimeoutError(f"{self.podman_name} not ready in {timeout} s ({status} {body}):\n{self.logs()}")

    def stop(self) -> int:
        """SIGTERM, then SIGKILL after the grace period, as the kubelet does; returns the exit code."""
        grace = self.spec.get("terminationGracePeriodSeconds", 30)
        subprocess.run(
            ["podman", "stop", "-t", str(grace), self.podman_name], capture_output=True, check=True
        )
        return self.exit_code()

    def kill(self) -> int:
        subprocess.run(["podman", "kill", "-s", "KILL", self.podman_name], capture_output=True, check=True)
        subprocess.run(["podman", "wait", self.podman_name], capture_output=True, check=False)
        return self.exit_code()

    def exit_code(self) -> int:
        out = subprocess.run(
            ["podman", "inspect", "--format", "{{.State.ExitCode}}", self.podman_name],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        return int(out.stdout.strip())

    def remove(self) -> None:
        subprocess.run(["podman", "rm", "-f", "-t", "0", self.podman_name], capture_output=True, check=False)
