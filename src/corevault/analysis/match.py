"""Whether a core matches a known fingerprint, as run inside the sandboxed worker's sandbox.

``python -m corevault.analysis.match CORE RECORD KNOWN`` prints ``{"matched": FINGERPRINT}``
when the crash's :mod:`fingerprint <corevault.analysis.fingerprint>` is in the JSON list
``KNOWN``, else ``{"unmatched": FINGERPRINT}`` (null when it has none), or ``{"error": "..."}``
for a core that cannot be read. It reads the core's notes and one stack read and nothing
else: none of the worker's unwinders and binary readers are imported (the worker's imports
are most of its start, and a match is all this run is for). It parses untrusted input, so
:mod:`corevault.analysis.runner` starts it as it starts the worker: sandboxed, with a timeout
and a memory cap.
"""

from __future__ import annotations

import json
import sys

from corevault.analysis import elfcore, fingerprint


def _list(path: str) -> list:
    with open(path, "rb") as f:
        loaded = json.load(f)
    return loaded if isinstance(loaded, list) else []


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        sys.stderr.write("usage: python -m corevault.analysis.match CORE RECORD KNOWN\n")
        return 2
    core_path, record_path, known_path = argv
    record = [m for m in _list(record_path) if isinstance(m, dict)]
    known = {k for k in _list(known_path) if isinstance(k, str)}
    try:
        mark = fingerprint.of(elfcore.read(core_path), record)
        doc = {"matched": mark} if mark is not None and mark in known else {"unmatched": mark}
    except elfcore.CoreError as e:
        doc = {"error": f"unreadable: {e}"}
    sys.stdout.write(json.dumps(doc))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
