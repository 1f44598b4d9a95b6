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
