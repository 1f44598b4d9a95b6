"""Debug files from upstream debuginfod servers: fetched once per build-id, verified, kept.

In a cluster a pod's libc is its image's, not the host's, so the host's
``/usr/lib/debug`` rarely has its debug file; the distribution's debuginfod server does
(``[analysis] debuginfod_urls``, read like elfutils' ``DEBUGINFOD_URLS``). The sandboxed
worker has no business on the network, so the analysis driver
(:mod:`corevault.analysis.runner`) asks here, between two runs of the worker, for the
modules the first run found no debug file for.

- Once per build-id: a fetched file is kept as ``<cache>/buildid/<id>/debuginfo``, the
  layout :func:`corevault.analysis.binaries.locate` reads; a miss on every server is
  remembered for :data:`RETRY_AFTER` seconds, so a storm of crashes of a program nobody
  has debug info for costs one round of requests, not one per crash.
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

from corevault import atomic
from corevault.analysis.binaries import file_build_id

if TYPE_CHECKING:
    from typing import BinaryIO

    from corevault.config import Settings

log = logging.getLogger("corevault.analysis")

BUILD_ID = re.compile(r"[0-9a-f]{2,128}")
MAX_PER_ANALYSIS = 16
RETRY_AFTER = 24 * 3600.0
MISSING = "missing"


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


def debuginfo_path(cache: str, build_id: str) -> str:
    return os.path.join(cache, "buildid", build_id, "debuginfo")


def fetch(upstream: Upstream, build_id: str, deadline: float | None = None) -> str | None:
    """The verified debug file for ``build_id``, fetched if it is not kept yet; None if no server
    has it, or none answered by ``deadline`` (monotonic), which is not remembered as a miss."""
    if not BUILD_ID.fullmatch(build_id):
        return None
    dest = debuginfo_path(upstream.cache, build_id)
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


def fetch_missing(upstream: Upstream, build_ids: list[str], deadline: float | None = None) -> list[str]:
    """Fetch what is not kept yet of the first :data:`MAX_PER_ANALYSIS` ``build_ids``, until
    ``deadline`` (monotonic: the analysis's); the ones kept now."""
    new = []
    for build_id in build_ids[:MAX_PER_ANALYSIS]:
        if os.path.exists(debuginfo_path(upstream.cache, build_id)):
            continue
        if _past(deadline):
            break
        if fetch(upstream, build_id, deadline) is not None:
            new.append(build_id)
    return new


def make_room(upstream: Upstream) -> list[str]:
    """Remove the debug files fetched longest ago (by their files' times) until the kept ones hold
    at most ``cache_max`` bytes; returns the build-ids removed. An analysis using one holds it
    open already; the next one that wants it fetches it again.

    A build-id's directory that holds no file goes too once nobody asked for it for
    :data:`RETRY_AFTER` (:func:`_forget`): a pod claims what build-ids it likes, sixteen more a
    crash, and each left a directory (and a miss remembered) for good."""
    root = os.path.join(upstream.cache, "buildid")
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return []
    kept = []
    now = time.time()
    for name in names:
        try:
            st = os.stat(debuginfo_path(upstream.cache, name))
        except OSError:
            _forget(os.path.join(root, name), now)
            continue
        kept.append((st.st_mtime, name, st.st_size))
    total = sum(size for _, _, size in kept)
    removed = []
    for _, name, size in sorted(kept):
        if total <= upstream.cache_max:
            break
        with contextlib.suppress(FileNotFoundError):
            os.unlink(debuginfo_path(upstream.cache, name))
        total -= size
        removed.append(name)
    if removed:
        log.info(
            "debug file cache over %d bytes: removed %d, the oldest fetched", upstream.cache_max, len(removed)
        )
    return removed


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
