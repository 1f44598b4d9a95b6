"""Compile the crash corpus (cached by source content and flags) with the host's gcc and g++.

Programs land in the rootfs at /app/<name>; ``libuser`` finds ``libcrashy.so`` there too.
"""

from __future__ import annotations

import hashlib
import os
import subprocess

from testbed.runc import WORK

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "programs")
# name: (source, compiler and flags)
PROGRAMS = {
    "crasher": ("crasher.c", ["gcc", "-g", "-O1", "-pthread"]),
    "thrower": ("thrower.cc", ["g++", "-g", "-O1"]),
    "libcrashy.so": ("libcrashy.c", ["gcc", "-g", "-O1", "-shared", "-fPIC", "-Wl,-soname,libcrashy.so"]),
    "libuser": ("libuser.c", ["gcc", "-g", "-O1", "-Wl,-rpath,/app"]),
    # not position-independent: mapped at 0x400000, as Go, Node and Debian's python3.11 are
    "crasher-static": ("crasher.c", ["gcc", "-g", "-O1", "-pthread", "-static"]),
    "crasher-nopie": ("crasher.c", ["gcc", "-g", "-O1", "-pthread", "-no-pie"]),
    "markup": ("markup.c", ["gcc", "-O1"]),
    "mention": ("mention.c", ["gcc", "-O1"]),
    "longname": ("longname.c", ["gcc", "-O1"]),
    "badname": ("badname.c", ["gcc", "-O1"]),
    "widestacks": ("widestacks.c", ["gcc", "-O1", "-pthread"]),
    "hang": ("hang.c", ["gcc", "-g", "-O1", "-pthread"]),
    "racer": ("racer.c", ["gcc", "-O1", "-Wall", "-Werror"]),
    "fsmount": ("fsmount.c", ["gcc", "-O1", "-Wall", "-Werror", "-static"]),
    "mapswap": ("mapswap.c", ["gcc", "-O1", "-Wall", "-Werror", "-static"]),
    "fusehang": ("fusehang.c", ["gcc", "-O1", "-Wall", "-Werror", "-static"]),
}


def _out(name: str, parts: bytes) -> str:
    return os.path.join(WORK, "bin", f"{hashlib.sha256(parts).hexdigest()[:12]}-{name}")


def build(name: str) -> str:
    """Path of the compiled program ``name`` (rebuilt when its source or flags change)."""
    if name == "crasher-stripped":
        # Built apart (its own build-id, so no unstripped twin in a store names its frames).
        src = os.path.join(HERE, "crasher.c")
        with open(src, "rb") as f:
            out = _out(name, f.read() + b"stripped")
        if not os.path.exists(out):
            subprocess.run(["gcc", "-O1", "-pthread", "-DSTRIPPED", "-o", out + ".tmp", src], check=True)
            subprocess.run(["strip", "--strip-all", out + ".tmp"], check=True)
            os.replace(out + ".tmp", out)
        return out
    source, cmd = PROGRAMS[name]
    src = os.path.join(HERE, source)
    extra: list[str] = []
    if name == "libuser":
        lib = build("libcrashy.so")
        extra = [lib]
    with open(src, "rb") as f:
        out = _out(name, f.read() + repr((cmd, extra)).encode())
    if not os.path.exists(out):
        os.makedirs(os.path.dirname(out), exist_ok=True)
        subprocess.run([*cmd, "-o", out + ".tmp", src, *extra], check=True)
        os.replace(out + ".tmp", out)
    return out


#: the kernel's static pipe handler for nodes without Python, built as the Dockerfile builds it
FORWARDER_SOURCE = os.path.join(os.path.dirname(HERE), "..", "src", "corevault", "capture", "forward.c")
FORWARDER_CMD = ["gcc", "-O2", "-static", "-Wall", "-Werror"]


def forwarder() -> str:
    """``corevault-forward`` (capture/forward.c), linked statically, cached."""
    src = os.path.normpath(FORWARDER_SOURCE)
    with open(src, "rb") as f:
        out = _out("corevault-forward", f.read() + repr(FORWARDER_CMD).encode())
    if not os.path.exists(out):
        os.makedirs(os.path.dirname(out), exist_ok=True)
        subprocess.run([*FORWARDER_CMD, "-o", out + ".tmp", src], check=True)
        os.replace(out + ".tmp", out)
    return out


def build_variant(name: str, source: str, cmd: list[str]) -> str:
    """A program built from ``source`` with ``cmd`` (a chosen build-id, none at all…), cached."""
    src = os.path.join(HERE, source)
    with open(src, "rb") as f:
        out = _out(name, f.read() + repr(cmd).encode())
    if not os.path.exists(out):
        os.makedirs(os.path.dirname(out), exist_ok=True)
        subprocess.run([*cmd, "-o", out + ".tmp", src], check=True)
        os.replace(out + ".tmp", out)
    return out


def build_go(source: str) -> str:
    """A Go program built the plain way (``go build``: Go's build id, no GNU one), cached."""
    cache = os.path.join(WORK, "go")
    env = {**os.environ, "GOCACHE": os.path.join(cache, "cache"), "GOPATH": os.path.join(cache, "path"),
           "GO111MODULE": "off", "CGO_ENABLED": "0"}  # fmt: skip
    src = os.path.join(HERE, source)
    with open(src, "rb") as f:
        out = _out(source.removesuffix(".go"), f.read() + b"go")
    if not os.path.exists(out):
        os.makedirs(os.path.dirname(out), exist_ok=True)
        subprocess.run(["go", "build", "-o", out + ".tmp", src], check=True, env=env)
        os.replace(out + ".tmp", out)
    return out


def build_all() -> dict[str, str]:
    return {name: build(name) for name in [*PROGRAMS, "crasher-stripped"]}


def other_glibc() -> str | None:
    """A Debian glibc build other than the host's, unpacked; None when the archive has none.

    A container image's libc is rarely the node's: this one has the same paths and the same
    version but different code and build-id, the case where a debugger using the host's
    files silently shows wrong frames.
    """
    installed = subprocess.run(
        ["dpkg-query", "-W", "-f=${Version}", "libc6"], capture_output=True, text=True, check=False
    ).stdout.strip()
    versions = [
        line.split("|")[1].strip()
        for line in subprocess.run(
            ["apt-cache", "madison", "libc6"], capture_output=True, text=True, check=False
        ).stdout.splitlines()
        if line.count("|") >= 2
    ]
    other = next((v for v in versions if v != installed), None)
    if other is None:
        return None
    target = os.path.join(WORK, f"glibc-{other}")
    if os.path.exists(os.path.join(target, "lib/x86_64-linux-gnu/libc.so.6")):
        return target
    debs = os.path.join(WORK, "debs")
    os.makedirs(debs, exist_ok=True)
    cmd = ["apt-get", "download", "-q", f"libc6={other}"]
    if subprocess.run(cmd, cwd=debs, capture_output=True, check=False).returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, check=False)
        if subprocess.run(cmd, cwd=debs, capture_output=True, check=False).returncode != 0:
            return None
    deb = next(
        os.path.join(debs, f) for f in os.listdir(debs) if f.startswith("libc6_") and f.endswith(".deb")
    )
    subprocess.run(["dpkg-deb", "-x", deb, target + ".tmp"], check=True)
    os.replace(target + ".tmp", target)
    return target
