"""Crash records for the triage tests, written through the catalog's own functions.

``add`` records a crash the way the agent does (its spool metadata, then its analysis
report), so groups, per-image counts, states, events and the search index are all made
by the code under test; only the values are invented.
"""

from __future__ import annotations

import itertools

from sqlalchemy.engine import Engine

from corevault.vault import catalog

_ids = itertools.count(1)


def report(signature: str, frames: list[str], signal: str = "SIGSEGV") -> dict:
    threads = [
        {"tid": 1, "crashed": True, "incomplete": False,
         "frames": [{"index": i, "pc": 0x1000 + i, "function": f, "module": "/app/svc", "offset": 16 * i}
                    for i, f in enumerate(frames)]},
        {"tid": 2, "crashed": False, "incomplete": False,
         "frames": [{"index": 0, "pc": 0x2000, "function": "epoll_wait", "module": "/lib/libc.so.6"}]},
    ]  # fmt: skip
    return {
        "signature": signature, "signature_frames": frames, "title": f"{signal} in {' ← '.join(frames[:2])}",
        "signal": {"number": 11 if signal == "SIGSEGV" else 6, "name": signal}, "backend": "drgn",
        "threads": threads, "modules": [], "warnings": [], "version": 1,
    }  # fmt: skip


def add(
    engine: Engine,
    *,
    signature: str,
    frames: list[str],
    namespace: str | None,
    image: str | None = "registry.example/web:1",
    pod: str = "web-1",
    when: int,
    node: str = "node-1",
    signal: str = "SIGSEGV",
) -> str:
    crash_id = f"c{next(_ids):06d}-{when}"
    meta = {
        "id": crash_id, "time": when, "node": node,
        "pod": {"namespace": namespace, "name": pod, "container": "app", "image": image} if namespace else {},
        "process": {"exe": "/app/svc", "comm": "svc", "ns_pid": 7},
        "signal": {"number": 11 if signal == "SIGSEGV" else 6, "name": signal},
        "core": {"size": 4096, "stored_size": 512},
    }  # fmt: skip
    with engine.begin() as conn:
        catalog.add_crash(conn, meta, "pending")
        catalog.record_analysis(conn, crash_id, report(signature, frames, signal))
    return crash_id


def many_rows(now: int, namespaces: int, count: int = 400) -> list[dict]:
    """``count`` crash rows of 9 groups over ``namespaces`` namespaces, 40 pods each, 5 images and
    one executable, for a search's words of few and many values; every tenth not analysed yet
    (in no group)."""
    rows = [
        {"id": f"c{i:04d}", "time": now - 7 * i % 900, "node": "n", "namespace": f"team-{i % namespaces}",
         "pod": f"team-{i % namespaces}-pod-{i * 7 % 40}", "container": "app",
         "image": f"registry.example/svc-{i % 5}:{i % 4}", "signal": 11, "signal_name": "SIGSEGV",
         "exe": "/usr/bin/service", "size": 1, "stored_size": 1, "truncated": False, "signature": f"{i % 9:016x}",
         "title": f"SIGSEGV in handler_{i % 9}", "analysis": "done" if i % 10 else "pending", "meta": "{}"}
        for i in range(count)
    ]  # fmt: skip
    for row in rows[::10]:
        row["signature"] = row["title"] = None
    return rows
