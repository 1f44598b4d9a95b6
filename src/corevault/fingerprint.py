"""Where a crash happened, cheaply: enough to match it to crashes analysed before, not to explain it.

A crash-looping pod sends the same crash hundreds of times; once its group has enough fully
analysed samples, the next one only has to be recognised. The capture handler takes the
fingerprint while the core streams past (:mod:`corevault.capture.corehead` reads the crashing
thread's registers from its first ``NT_PRSTATUS`` note, a tap on the stream keeps the
:data:`STACK_BYTES` at its stack pointer), without unwinding and without any binary:

- the signal and its ``si_code``;
- the crashing thread's program counter, and the first :data:`MAX_ADDRESSES` words from its
  stack pointer that point into a mapped object (return addresses, mostly), each written as
  the object's content identity and the offset from its load address.

The objects are the crash's record (what the handler found in ``/proc/PID/maps`` and hashed:
the file's SHA-256 and its key), never the core's own claims: a build-id is a claim, the
content hash is the file. So a pod cannot produce another program's fingerprint without
running that very program, and addresses differ across runs only by ASLR, which the offsets
take out. Words that point elsewhere (heap, anonymous JIT code) are left out. A crash whose
program counter is in no recorded object, or whose stack window is not in the core (cut
short), has no fingerprint and is always analysed in full.

Matching is only ever among the crashes of one namespace and executable (the catalog's side,
:func:`corevault.vault.recording.match_sample`): whatever a tenant does to its own fingerprints,
it can only land in a group its own crashes made.
"""

from __future__ import annotations

import struct

from corevault import hashing, quickjson

TYPE_CHECKING = False  # typing.TYPE_CHECKING would import typing, which the crash path never loads
if TYPE_CHECKING:
    import re

    FORMAT: re.Pattern[str]

#: bytes read from the stack pointer up: 64 words
STACK_BYTES = 512
#: how many of them, pointing into objects, make the fingerprint
MAX_ADDRESSES = 16


def __getattr__(name: str) -> re.Pattern[str]:
    """``FORMAT``, what a fingerprint looks like, compiled on first use: the capture handler
    takes fingerprints but never checks one, and ``re`` would cost it ~7 ms of every crash."""
    if name != "FORMAT":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import re

    globals()[name] = compiled = re.compile(r"^[0-9a-f]{32}\Z")
    return compiled


def _places(addresses: list[int], objects: list[tuple[int, int, str]]) -> dict[int, str]:
    """Each of ``addresses`` that lies in one of ``objects`` (sorted by start), as ``key/sha256+offset``
    of the last object that starts at or below it. One walk of both in order, without ``bisect``:
    that module (Python code, then its C part) is an import of its own on every crash's path."""
    found: dict[int, str] = {}
    i = -1
    for address in sorted(set(addresses)):
        while i + 1 < len(objects) and objects[i + 1][0] <= address:
            i += 1
        if i >= 0 and address < objects[i][1]:
            found[address] = f"{objects[i][2]}+{address - objects[i][0]:x}"
    return found


def of(signal: int | None, code: int | None, pc: int | None, stack: bytes, modules: list[dict]) -> str | None:
    """The fingerprint (32 hex digits), or None when the crash has none.

    ``stack`` is the :data:`STACK_BYTES` at the stack pointer (little-endian words);
    ``modules`` the crash record's (``start``, ``end``, ``key``, ``sha256``).
    """
    if not signal or pc is None or len(stack) < STACK_BYTES:
        return None
    objects = sorted(
        (m["start"], m["end"], f"{m['key']}/{m['sha256']}")
        for m in modules
        if isinstance(m.get("start"), int) and isinstance(m.get("end"), int)
        if m.get("key") and m.get("sha256")
    )
    words = [word for (word,) in struct.iter_unpack("<Q", stack[:STACK_BYTES])]
    where = _places([pc, *words], objects)
    at = where.get(pc)
    if at is None:
        return None
    places = [at]
    for word in words:
        place = where.get(word)
        if place is not None:
            places.append(place)
            if len(places) > MAX_ADDRESSES:
                break
    return hashing.sha256_hex(quickjson.dumps([signal, code, places]).encode())[:32]
