"""Building the corevault image offline from any registry: ``make image`` and the image tests.

Steps, each skipped when its result is already there:
1. the ``debian:bookworm-slim`` base: where no such image is present (none can be pulled here),
   ``mmdebstrap --variant=minbase bookworm`` makes one from Debian's packages, trimmed like the
   official slim image (no manuals, docs or translations), imported and tagged under both names
   the Dockerfile's ``FROM`` may resolve to;
2. the wheels: ``pip wheel`` on this host into build/wheels (dependencies and corevault apart,
   so the dependencies' layer stays cached), since pip in a build cannot verify PyPI here;
3. ``podman build --pull=never`` of the Dockerfile, tagged ``localhost/corevault:<inputs hash>``.

The tag is a hash of everything the image is made from (Dockerfile, pyproject.toml, src/), so
tests build once and reuse the image from podman's storage (outside the checkout) until an
input changes. podman's default rlimits are refused on this kind of VM, so every podman
command here gets ``--ulimit`` values within the host's hard limits.
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import os
import resource
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager, suppress

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO = "localhost/corevault"
BASES = ("localhost/debian:bookworm-slim", "docker.io/library/debian:bookworm-slim")
CACHE = "/var/cache/corevault-image"
OCI_ARCHIVE = "corevault.oci.tar"
PODMAN_CAP = 32768
SLIM = ("/usr/share/doc/*", "/usr/share/man/*", "/usr/share/locale/*", "/usr/share/info/*")


def ulimits() -> list[str]:
    """``--ulimit`` options for podman build/run: podman's defaults are refused on this kind of VM.

    Within this process's hard limits and at most 32768: podman lowers its own limits before it
    starts runc (its conmon runs with nproc 32768 here), and a container asking for more, even
    within the login shell's hard limit of 96365, is refused with EPERM.
    """
    opts = []
    for name, which in (("nofile", resource.RLIMIT_NOFILE), ("nproc", resource.RLIMIT_NPROC)):
        hard = resource.getrlimit(which)[1]
        limit = PODMAN_CAP if hard == resource.RLIM_INFINITY else min(hard, PODMAN_CAP)
        opts += ["--ulimit", f"{name}={limit}:{limit}"]
    return opts


def podman(*args: str, check: bool = True, capture: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(["podman", *args], capture_output=capture, text=True, check=False)
    if check and out.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args[:2])} failed: {(out.stderr or '').strip()[-2000:]}")
    return out


def exists(image: str) -> bool:
    return podman("image", "exists", image, check=False).returncode == 0


def inputs_hash(root: str = ROOT) -> str:
    """A hash of what the image is made of: changing any of these makes a new tag."""
    h = hashlib.sha256()
    files = ["Dockerfile", "pyproject.toml", "README.md", ".containerignore"]
    files += sorted(
        os.path.relpath(p, root)
        for p in glob.glob(os.path.join(root, "src", "**", "*"), recursive=True)
        if os.path.isfile(p) and "__pycache__" not in p
    )
    for rel in files:
        h.update(rel.encode() + b"\0")
        with open(os.path.join(root, rel), "rb") as f:
            h.update(hashlib.sha256(f.read()).digest())
    return h.hexdigest()[:16]


@contextmanager
def _locked() -> Iterator[None]:
    """One build at a time on this host (two test runs may want the image at once)."""
    os.makedirs(CACHE, exist_ok=True)
    with open(os.path.join(CACHE, "build.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def ensure_base() -> None:
    if any(exists(b) for b in BASES):
        for b in BASES:
            if not exists(b):
                podman("tag", next(x for x in BASES if exists(x)), b)
        return
    tar = os.path.join(CACHE, f"bookworm-minbase-{os.getpid()}.tar")
    print(f"making {BASES[0]} from Debian packages (mmdebstrap)", file=sys.stderr)
    try:
        # merged /usr by mmdebstrap's own hook, as the official image is made: the usrmerge package
        # would otherwise pull perl (45 MB) into the base
        subprocess.run(
            ["mmdebstrap", "--variant=minbase", "--format=tar", "--quiet",
             "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr",
             *(f"--dpkgopt=path-exclude={p}" for p in SLIM),
             "--dpkgopt=path-include=/usr/share/doc/*/copyright",
             "bookworm", tar],
            check=True,
        )  # fmt: skip
        podman("import", "--change", 'CMD ["bash"]', tar, BASES[0])
        podman("tag", BASES[0], BASES[1])
    finally:
        with suppress(FileNotFoundError):
            os.unlink(tar)  # podman's storage holds it now


def build_wheels(root: str = ROOT) -> None:
    """Wheels for the image: every dependency of pyproject.toml, and corevault itself apart."""
    deps, app = os.path.join(root, "build/wheels/deps"), os.path.join(root, "build/wheels/corevault")
    os.makedirs(deps, exist_ok=True)
    shutil.rmtree(app, ignore_errors=True)
    with open(os.path.join(root, "pyproject.toml"), "rb") as f:
        requirements = tomllib.load(f)["project"]["dependencies"]
    with open(os.path.join(deps, "requirements.txt"), "w") as f:
        f.write("\n".join(requirements) + "\n")
    pip = [sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "-w", deps, "-r", os.path.join(deps, "requirements.txt")], check=True)
    subprocess.run([*pip, "--no-deps", "-w", app, root], check=True)


def build(root: str = ROOT, oci_archive: str | None = None) -> str:
    """Build the image (and the OCI archive when asked); returns its tag."""
    tag = f"{REPO}:{inputs_hash(root)}"
    with _locked():
        if not exists(tag):
            ensure_base()
            build_wheels(root)
            podman(
                "build", "--pull=never", "--network", "host", *ulimits(), "--layers",
                "-t", tag, "-t", f"{REPO}:latest", "-f", os.path.join(root, "Dockerfile"), root,
                capture=False,
            )  # fmt: skip
            _forget_older(tag)
        if oci_archive:
            if os.path.exists(oci_archive):
                os.unlink(oci_archive)
            podman("save", "--format", "oci-archive", "-o", oci_archive, tag)
    return tag


def _forget_older(tag: str) -> None:
    """Untag the images built from older inputs, so that every edit does not keep 500 MB more."""
    listed = podman("images", "--format", "{{.Repository}}:{{.Tag}}", "--filter", f"reference={REPO}")
    older = [t for t in listed.stdout.split() if t not in (tag, f"{REPO}:latest")]
    if older:
        podman("rmi", *older, check=False)


def size(tag: str) -> int:
    return int(podman("image", "inspect", "--format", "{{.Size}}", tag).stdout.strip())


def main() -> None:
    started = time.monotonic()
    archive = os.path.join(ROOT, OCI_ARCHIVE)
    tag = build(ROOT, archive)
    took = time.monotonic() - started
    print(podman("history", "--format", "{{.Size}}\t{{.CreatedBy}}", tag).stdout[:4000])
    print(f"{tag}: {size(tag) / 1e6:.0f} MB uncompressed, built in {took:.0f} s")
    print(f"OCI archive: {archive} ({os.path.getsize(archive) / 1e6:.0f} MB); push it with")
    print(f"  skopeo copy oci-archive:{OCI_ARCHIVE} docker://REGISTRY/corevault:TAG")


if __name__ == "__main__":
    main()
