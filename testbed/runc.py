"""Real containers on one machine: runc, a busybox rootfs and kubepods-style cgroups.

A crashing process in one of these containers has exactly a Kubernetes node's
``/proc/PID/cgroup`` (the cgroup path is the kubelet's, for either cgroup driver), its own
PID, mount, UTS and IPC namespaces, a read-only root and a host directory bind-mounted as
the pod's volume. Pod annotations go into the OCI bundle's ``annotations`` (as runc, CRI-O
and containerd with ``pod_annotations`` carry them). Every container is deleted after it
ran, also when the run fails.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field

WORK = "/tmp/corevault-testbed"
BUSYBOX = "/bin/busybox"
APPLETS = ("sh", "ln", "mkfifo", "mknod", "mkdir", "sleep", "cat", "ls", "touch", "echo", "chmod", "rm")
# Docker's default capability set: what an ordinary container process has.
CAPS = [
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW", "CAP_SETGID",
    "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT", "CAP_KILL",
    "CAP_AUDIT_WRITE",
]  # fmt: skip
VOLUME_PATH = "/data/dump-a"


def new_pod_uid() -> str:
    return str(uuid.uuid4())


def new_container_id() -> str:
    return os.urandom(32).hex()


def cgroups_path(pod_uid: str, container_id: str, driver: str = "cgroupfs", qos: str = "burstable") -> str:
    """The cgroup the kubelet gives a container, for the cgroupfs or the systemd driver."""
    if driver == "cgroupfs":
        return f"/kubepods/{qos}/pod{pod_uid}/{container_id}"
    if driver == "systemd":
        slice_uid = pod_uid.replace("-", "_")
        return (
            f"/kubepods.slice/kubepods-{qos}.slice/kubepods-{qos}-pod{slice_uid}.slice/"
            f"cri-containerd-{container_id}.scope"
        )
    raise ValueError(f"unknown cgroup driver {driver!r}")


def libraries(binary: str) -> list[str]:
    out = subprocess.run(["ldd", binary], capture_output=True, text=True, check=False).stdout
    libs = []
    for line in out.splitlines():
        parts = line.split()
        if "=>" in parts and len(parts) >= 3 and parts[2].startswith("/"):
            libs.append(parts[2])
        elif parts and parts[0].startswith("/"):
            libs.append(parts[0])
    return libs


def build_rootfs(path: str, programs: dict[str, str], glibc: str | None = None) -> str:
    """A busybox-static root with ``programs`` at /app/<name> and the libraries they need.

    ``glibc``, an unpacked libc6 package, replaces the host's libc and dynamic loader.
    """
    if os.path.exists(path):
        shutil.rmtree(path)
    for d in ("bin", "app", "proc", "dev", "sys", "tmp", "etc", VOLUME_PATH.lstrip("/")):
        os.makedirs(os.path.join(path, d), exist_ok=True)
    shutil.copy2(BUSYBOX, os.path.join(path, "bin/busybox"))
    for applet in APPLETS:
        os.symlink("busybox", os.path.join(path, "bin", applet))
    with open(os.path.join(path, "etc/passwd"), "w") as f:
        f.write("root:x:0:0:root:/:/bin/sh\nwww-data:x:33:33:www-data:/:/bin/sh\n")
    for name, src in programs.items():
        shutil.copy2(src, os.path.join(path, "app", name))
        for lib in libraries(src):
            dest = os.path.join(path, lib.lstrip("/"))
            if not os.path.exists(dest):
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                shutil.copy2(os.path.realpath(lib), dest)
    if glibc is not None:
        for name in ("libc.so.6", "ld-linux-x86-64.so.2"):
            src = os.path.join(glibc, "lib/x86_64-linux-gnu", name)
            dest = os.path.join(path, "lib/x86_64-linux-gnu", name)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            shutil.copy2(src, dest)
        loader = os.path.join(path, "lib64/ld-linux-x86-64.so.2")
        os.makedirs(os.path.dirname(loader), exist_ok=True)
        with suppress(FileNotFoundError):
            os.unlink(loader)
        shutil.copy2(os.path.join(glibc, "lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"), loader)
    return path


def dump_helpers(since: float = 0.0) -> list[int]:
    """The pids of the kernel's usermode helpers (core_pattern's pipe handlers among them: user
    processes whose parent is kthreadd) running now and started at ``since`` (seconds since boot,
    :func:`uptime`) or later."""
    tick = os.sysconf("SC_CLK_TCK")
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    fields = f.read().rpartition(b")")[2].split()
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    # kernel threads have no command line; starttime is in clock ticks since boot
                    if int(fields[1]) == 2 and f.read() and int(fields[19]) / tick >= since:
                        pids.append(int(name))
            except (OSError, ValueError, IndexError):  # gone meanwhile
                pass
    return pids


def uptime() -> float:
    with open("/proc/uptime") as f:
        return float(f.read().split()[0])


def wait_for_dump_helpers(since: float, timeout: float = 120.0) -> None:
    """Wait until the kernel's usermode helpers started since ``since`` (:func:`uptime`) have exited.

    The capture handler lets the kernel release a crashed process once it has read the core and
    published the plain copy, and finishes its spool entry after that: a container's exit does
    not say the entry is there yet. Helpers started before are left to whoever started them
    (a test may hold one stopped).
    """
    deadline = time.monotonic() + timeout
    while dump_helpers(since):
        assert time.monotonic() < deadline, f"a core handler still runs after {timeout:g} s"
        time.sleep(0.01)


@dataclass
class Container:
    """One container run: ``run()`` creates the bundle, runs the process, deletes the container."""

    rootfs: str
    args: list[str]
    volume: str | None = None
    volume_path: str = VOLUME_PATH
    annotations: dict[str, str] = field(default_factory=dict)
    pod_uid: str = field(default_factory=new_pod_uid)
    id: str = field(default_factory=new_container_id)
    driver: str = "cgroupfs"
    hostname: str = "pod-0"
    rlimit_core: tuple[int, int] | None = ((1 << 64) - 1, (1 << 64) - 1)
    uid: int = 0
    #: more OCI mounts, made in the container's own mount namespace only
    mounts: list[dict] = field(default_factory=list)
    #: capabilities beyond Docker's default set (CAP_SYS_ADMIN for a FUSE server of its own)
    extra_caps: list[str] = field(default_factory=list)
    #: character devices the container may open, as ``(path, major, minor)`` (/dev/fuse)
    devices: list[tuple[str, int, int]] = field(default_factory=list)
    bundle: str = ""

    @property
    def cgroups_path(self) -> str:
        return cgroups_path(self.pod_uid, self.id, self.driver)

    def spec(self) -> dict:
        out = subprocess.run(
            ["runc", "spec", "--bundle", self.bundle], capture_output=True, text=True, check=False
        )
        if out.returncode != 0:
            raise RuntimeError(f"runc spec failed: {out.stderr.strip()}")
        with open(os.path.join(self.bundle, "config.json")) as f:
            spec = json.load(f)
        proc = spec["process"]
        proc.update(terminal=False, args=self.args, cwd="/")
        proc["user"] = {"uid": self.uid, "gid": self.uid}
        proc["env"] = ["PATH=/bin:/app", "HOME=/"]
        for kind in ("bounding", "effective", "permitted"):
            proc["capabilities"][kind] = CAPS + self.extra_caps
        proc["capabilities"].pop("inheritable", None)
        proc["capabilities"].pop("ambient", None)
        rlimits = [r for r in proc.get("rlimits", []) if r["type"] != "RLIMIT_CORE"]
        if self.rlimit_core is not None:
            soft, hard = self.rlimit_core
            rlimits.append({"type": "RLIMIT_CORE", "soft": soft, "hard": hard})
        proc["rlimits"] = rlimits
        spec["root"] = {"path": self.rootfs, "readonly": True}
        spec["hostname"] = self.hostname
        if self.volume is not None:
            spec["mounts"].append(
                {
                    "destination": self.volume_path,
                    "type": "bind",
                    "source": self.volume,
                    "options": ["rbind", "rw"],
                }
            )
        spec["mounts"] += self.mounts
        for path, major, minor in self.devices:
            spec["linux"].setdefault("devices", []).append(
                {"path": path, "type": "c", "major": major, "minor": minor, "fileMode": 0o666}
            )
            spec["linux"]["resources"]["devices"].append(
                {"allow": True, "type": "c", "major": major, "minor": minor, "access": "rwm"}
            )
        spec["linux"]["cgroupsPath"] = self.cgroups_path
        spec["annotations"] = dict(self.annotations)
        return spec

    def _write_bundle(self) -> None:
        os.makedirs(WORK, exist_ok=True)
        self.bundle = os.path.join(WORK, "bundle-" + self.id[:12])
        os.makedirs(self.bundle, exist_ok=True)
        spec = self.spec()
        with open(os.path.join(self.bundle, "config.json"), "w") as f:
            json.dump(spec, f)

    def _delete(self) -> None:
        subprocess.run(["runc", "delete", "--force", self.id], capture_output=True, check=False)
        shutil.rmtree(self.bundle, ignore_errors=True)

    def run(self, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run the container to its end; returns once the kernel's core handlers are done too."""
        try:
            self._write_bundle()
            since = uptime() - 0.02  # a tick of slack: starttime is counted in 10 ms ticks
            result = subprocess.run(
                ["runc", "run", "--bundle", self.bundle, self.id],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
            wait_for_dump_helpers(since)
            return result
        finally:
            self._delete()

    @contextmanager
    def running(self) -> Iterator[subprocess.Popen]:
        """Run the process in the background; when the block ends it is killed and the container deleted.

        The block starts once the process has printed its first line (its "ready").
        """
        try:
            self._write_bundle()
            proc = subprocess.Popen(
                ["runc", "run", "--bundle", self.bundle, self.id],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            try:
                assert proc.stdout is not None
                proc.stdout.readline()
                yield proc
            finally:
                if proc.poll() is None:
                    subprocess.run(["runc", "kill", self.id, "KILL"], capture_output=True, check=False)
                    proc.wait(timeout=30)
        finally:
            self._delete()

    def pid(self) -> int:
        """The host PID of the container's first process."""
        out = subprocess.run(["runc", "state", self.id], capture_output=True, text=True, check=True)
        return int(json.loads(out.stdout)["pid"])
