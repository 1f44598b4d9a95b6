"""Search benchmark: crash searches of several words in-process on SQLite, against the walk of time.

    python -m bench.search [--rows 100000] [--runs 15]

Over ``bench.server``'s SQLite catalog of ``--rows`` crashes (2,000 groups in 50 namespaces,
500 pods and 7 services per namespace), each search is timed with the start from a word's
crashes (:func:`corevault.vault.search._widest_start`) and, taking turns in the same run,
without it (the walk of the time index, as before that start). Printed: the
p50 of each (goal ≤ 50 ms), their ratio, and whether both found the same page.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time

from bench import server
from corevault import config
from corevault.vault import catalog, queries, search

TEAM = frozenset({"team-7"})
#: two words each too common to start from but rare together; then searches whose walk is short
CASES = [
    ("svc-3 pod-42", None),
    ("svc-3 pod-42", TEAM),
    ("svc-3 handler_0", None),
    ("pod-42 handler_0", None),
    ("pod- svc-", TEAM),
    ("team-7-pod-123", None),
    ("handler_0", TEAM),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=15)
    a = ap.parse_args()
    state = tempfile.mkdtemp(prefix="cv-bench-search-")
    start = search._widest_start
    try:
        server.fill(state, a.rows, 1)
        engine = catalog.connect(config.from_dict({"state_dir": state}).catalog_url)
        print(f"p50 of {a.runs} in-process searches, {a.rows:,} crashes on SQLite (goal <= 50 ms)")
        with engine.connect() as conn:
            for q, visible in CASES:
                filters = queries.Filters(search=q, visible=visible)
                times: dict[str, list[float]] = {"start": [], "walk": []}
                pages: dict[str, list[str]] = {}
                for _ in range(a.runs):
                    for way, took in times.items():  # taking turns: the machine's load falls on both
                        search._widest_start = start if way == "start" else lambda *_: None
                        t = time.perf_counter()
                        rows = queries.list_crashes(conn, filters)
                        took.append((time.perf_counter() - t) * 1000)
                        pages[way] = [r["id"] for r in rows]
                now, walk = statistics.median(times["start"]), statistics.median(times["walk"])
                goal = "" if now <= 50 else "  (goal <= 50 ms NOT met)"
                reader = "one namespace" if visible else "every namespace"
                print(
                    f"  {q!r:<20} {reader:<16} {now:6.1f} ms, the walk {walk:6.1f} ms: {walk / now:4.2f}x"
                    f"  same page: {pages['start'] == pages['walk']}{goal}"
                )
    finally:
        search._widest_start = start
        shutil.rmtree(state, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
