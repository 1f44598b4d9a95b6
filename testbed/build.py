"""Compile the crash corpus (cached by source content) with the host's gcc and g++."""

from __future__ import annotations

import hashlib
import os
import subprocess

from testbed.runc import WORK

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "programs")
PROGRAMS = {
    "crasher": ("crasher.c", ["gcc", "-g", "-O1", "-pthread"]),
    "thrower": ("thrower.cc", ["g++", "-g", "-O1"]),
}


def build(name: str, extra: tuple[str, ...] = ()) -> str:
    """Path of the compiled program ``name`` (rebuilt when its source or flags change)."""
    source, cmd = PROGRAMS[name]
    src = os.path.join(HERE, source)
    with open(src, "rb") as f:
        digest = hashlib.sha256(f.read() + repr((cmd, extra)).encode()).hexdigest()[:12]
    out = os.path.join(WORK, "bin", f"{name}-{digest}")
    if not os.path.exists(out):
        os.makedirs(os.path.dirname(out), exist_ok=True)
        subprocess.run([*cmd, *extra, "-o", out + ".tmp", src], check=True)
        os.replace(out + ".tmp", out)
    return out


def build_all() -> dict[str, str]:
    return {name: build(name) for name in PROGRAMS}
