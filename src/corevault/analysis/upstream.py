"""Debug files from upstream debuginfod servers: fetched once per build-id, verified, kept.

In a cluster a pod's libc is its image's, not the host's, so the host's
``/usr/lib/debug`` rarely has its debug file; the distribution's debuginfod server does
(``[analysis] debuginfod_urls``, read like elfutils' ``DEBUGINFOD_URLS``). The sandboxed
worker has no business on the network, so the analysis driver
(:mod:`corevault.analysis.runner`) asks here, between two runs of the worker, for the
modules the first run found no debug file for.

- Once per build-id and content: a fetched file is kept as
  ``<cache>/buildid/<id>/<sha256>.debuginfo``, where ``<sha256>`` is the content hash of the
  object the crash really mapped (its record's), and is given only to analyses of crashes
  that mapped that very content (:func:`corevault.analysis.binaries.debug_file`). A
  build-id is a claim: a pod that forges another tenant's in its own binary gets a fetch of
  its own, answered as the upstream answers anyone asking by that build-id (its own access
  control), never the file kept for the other tenant's content. Files kept by build-id
  alone (``<cache>/buildid/<id>/debuginfo``, before content hashes) are never read and are
  removed (:func:`make_room`). A miss on every server is remembered per build-id for
  :data:`RETRY_AFTER` seconds (the servers are asked by build-id alone, so the answer is
  the same for any content), so a storm of crashes of a program nobody has debug info for
  costs one round of requests, not one per crash.
- Checked: a download goes to a temporary name, may take at most ``timeout`` seconds and
  ``max_size`` bytes, and is kept only when its own build-id is the one asked for (a
  server or a proxy can be wrong: an error page, another version of the library).
- Bounded: one analysis asks for at most :data:`MAX_PER_ANALYSIS` build-ids, so a process
  that maps thousands of made-up objects cannot keep the agent busy for other tenants; and
  within the analysis's own time: a pod chooses the build-ids its objects claim (the real
  ones of large debug files, say), and each download could take ``timeout`` seconds past it,
  sixteen times. What is kept is bounded too (``cache_max``): past it, the files fetched
  longest ago are removed (:func:`make_room`, after each analysis), so a pod whose crashes
  claim ever other build-ids cannot fill the node's disk, where the spool is.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from corevault import atomic, objectid
from corevault.analysis.binaries import file_build_id

if TYPE_CHECKING:
    from typing import BinaryIO

    from corevault.config import Settings

log = logging.getLogger("corevault.analysis")

BUILD_ID = re.compile(r"[0-9a-f]{2,128}")
MAX_PER_ANALYSIS = 16
RETRY_AFTER = 24 * 3600.0
MISSING = "missing"
#: a kept file's name ends so: ``<sha256 of the object it was fetched for>.debuginfo``
SUFFIX = ".debuginfo"
#: what files kept by build-id alone were named (before content hashes): never read, removed
LEGACY_NAME = "debuginfo"


@dataclass(frozen=True, slots=True)
class Upstream:
    urls: tuple[str, ...]
    #: where fetched files are kept, in the debuginfod layout
    cache: str
    timeout: float = 30.0
    max_size: int = 1 << 30
    #: bytes the kept files may hold in all
    cache_max: int = 4 << 30


def from_settings(settings: Settings) -> Upstream | None:
    """The upstream servers a node's settings name, or None when there are none."""
    if not settings.debuginfod_urls:
        return None
    return Upstream(
        settings.debuginfod_urls,
        settings.debuginfo_dir,
        settings.debuginfod_timeout,
        settings.debuginfod_max_size,
        settings.debuginfod_cache_max,
    )


def debuginfo_path(cache: str, build_id: str, sha256: str) -> str:
    """Where the debug file fetched for the object of content ``sha256`` claiming ``build_id`` is kept."""
    return os.path.join(cache, "buildid", build_id, sha256 + SUFFIX)


def fetch(upstream: Upstream, build_id: str, sha256: str, deadline: float | None = None) -> str | None:
    """The verified debug file for ``build_id``, for the object of content ``sha256``, fetched if
    it is not kept yet for that content; None if no server has it, or none answered by
    ``deadline`` (monotonic), which is not remembered as a miss."""
    if not (BUILD_ID.fullmatch(build_id) and objectid.is_object(build_id, sha256)):
        return None
    dest = debuginfo_path(upstream.cache, build_id, sha256)
    if os.path.exists(dest):
        return dest
    missing = os.path.join(os.path.dirname(dest), MISSING)
    with contextlib.suppress(OSError):
        if time.time() - os.stat(missing).st_mtime < RETRY_AFTER:
            return None
    os.makedirs(os.path.dirname(dest), mode=0o755, exist_ok=True)
    for url in upstream.urls:
        if _past(deadline):
            return None
        if _download(upstream, f"{url.rstrip('/')}/buildid/{build_id}/debuginfo", build_id, dest, deadline):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(missing)
            return dest
    if _past(deadline):
        return None  # cut short: the next analysis asks again
    with contextlib.suppress(FileNotFoundError), open(missing, "w"):
        pass  # its mtime says when every server was last asked (its directory, if not forgotten meanwhile)
    return None


def _past(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() >= deadline


def _download(upstream: Upstream, url: str, build_id: str, dest: str, deadline: float | None) -> bool:
    import httpx  # only when a server is asked: the runner that imports this module stays light

    try:
        with atomic.replacing(dest, 0o644) as f:
            if not _receive(upstream, url, build_id, f, deadline):
                raise atomic.Abandon
            return True
    except (httpx.HTTPError, OSError) as e:
        log.warning("debuginfod %s: %s", url, e)
    return False


def _receive(upstream: Upstream, url: str, build_id: str, f: BinaryIO, until: float | None) -> bool:
    """Write the server's answer into ``f``; whether it is the file of ``build_id``, within the
    limits: ``timeout`` seconds, and the analysis's deadline ``until`` (monotonic), if any."""
    import httpx

    deadline = time.monotonic() + upstream.timeout
    if until is not None:
        deadline = min(deadline, until)
    with httpx.stream("GET", url, timeout=max(deadline - time.monotonic(), 0.001)) as response:
        if response.status_code != 200:
            if response.status_code != 404:
                log.warning("debuginfod %s: HTTP %d", url, response.status_code)
            return False
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > upstream.max_size:
            log.warning("debuginfod %s: %s bytes, over the limit of %d", url, declared, upstream.max_size)
            return False
        size = 0
        # as they arrive: chunks of a set size would wait for a slow server's bytes past the deadline
        for chunk in response.iter_bytes():
            size += len(chunk)
            if size > upstream.max_size:
                log.warning("debuginfod %s: more than the limit of %d bytes", url, upstream.max_size)
                return False
            if time.monotonic() > deadline:
                log.warning(
                    "debuginfod %s: not done within %gs or the analysis's time, given up",
                    url,
                    upstream.timeout,
                )
                return False
            f.write(chunk)
    f.flush()
    found = file_build_id(f.name)
    if found != build_id:
        log.warning("debuginfod %s: the file's build-id is %s, not the one asked for", url, found)
        return False
    return True


def fetch_missing(
    upstream: Upstream, wanted: list[tuple[str, str]], deadline: float | None = None
) -> list[tuple[str, str]]:
    """Fetch what is not kept yet of the first :data:`MAX_PER_ANALYSIS` ``wanted`` ``(build-id,
    sha256 of the object mapped)``, until ``deadline`` (monotonic: the analysis's); the ones
    kept now."""
    new = []
    for build_id, sha256 in wanted[:MAX_PER_ANALYSIS]:
        if not objectid.is_object(build_id, sha256):
            continue
        if os.path.exists(debuginfo_path(upstream.cache, build_id, sha256)):
            continue
        if _past(deadline):
            break
        if fetch(upstream, build_id, sha256, deadline) is not None:
            new.append((build_id, sha256))
    return new


def make_room(upstream: Upstream) -> list[str]:
    """Remove the debug files fetched longest ago (by their files' times) until the kept ones hold
    at most ``cache_max`` bytes; returns the files removed (``<build-id>/<name>``). An analysis
    using one holds it open already; the next one that wants it fetches it again. Files kept by
    build-id alone (:data:`LEGACY_NAME`, before content hashes) go at once: nothing reads them,
    and no one knows which content they were fetched for.

    A build-id's directory that holds no file goes too once nobody asked for it for
    :data:`RETRY_AFTER` (:func:`_forget`): a pod claims what build-ids it likes, sixteen more a
    crash, and each left a directory (and a miss remembered) for good."""
    root = os.path.join(upstream.cache, "buildid")
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return []
    kept = []
    legacy = []
    now = time.time()
    for name in names:
        directory = os.path.join(root, name)
        try:
            files = os.listdir(directory)
        except OSError:
            continue
        found = False
        for file in files:
            path = os.path.join(directory, file)
            if file == LEGACY_NAME:
                with contextlib.suppress(OSError):
                    os.unlink(path)
                    legacy.append(f"{name}/{file}")
                continue
            if not file.endswith(SUFFIX):
                continue
            try:
                st = os.stat(path)
            except OSError:
                continue
            found = True
            kept.append((st.st_mtime, f"{name}/{file}", st.st_size))
        if not found:
            _forget(directory, now)
    if legacy:
        log.info("removed %d debug files kept by build-id alone (their content unknown)", len(legacy))
    total = sum(size for _, _, size in kept)
    removed = []
    for _, name, size in sorted(kept):
        if total <= upstream.cache_max:
            break
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(root, name))
        total -= size
        removed.append(name)
    if removed:
        log.info(
            "debug file cache over %d bytes: removed %d, the oldest fetched", upstream.cache_max, len(removed)
        )
    return legacy + removed


def _forget(directory: str, now: float) -> None:
    """Remove a build-id's directory that holds no debug file once it is idle: its miss older
    than :data:`RETRY_AFTER` (no fetch heeds it any more), or, with no miss in it (its file
    removed, a download cut short), the directory itself untouched that long. A fetch that
    makes it again meanwhile finds it gone and asks again at the next crash."""
    missing = os.path.join(directory, MISSING)
    try:
        try:
            if now - os.stat(missing).st_mtime < RETRY_AFTER:
                return
            os.unlink(missing)
        except FileNotFoundError:
            if now - os.stat(directory).st_mtime < RETRY_AFTER:
                return
        os.rmdir(directory)  # not while a download writes in it (ENOTEMPTY)
    except OSError:
        pass
