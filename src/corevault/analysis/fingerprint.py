"""Where a crash happened, cheaply: enough to match it to crashes analysed before, not to explain it.

A crash-looping pod sends the same crash hundreds of times; once its group has enough fully
analysed samples, the next one only has to be recognised. The fingerprint is read from the
core's notes and one read of the crashing thread's stack, without unwinding and without any
binary:

- the signal and its ``si_code``;
- the crashing thread's program counter, and the first :data:`STACK_WORDS` words from its
  stack pointer that point into a mapped object (return addresses, mostly), each written as
  the object's content identity and the offset from its load address.

The objects are the crash's record (what the handler found in ``/proc/PID/maps`` and hashed
at crash time: the file's SHA-256 and its key), never the core's own claims: a build-id is a
claim, the content hash is the file. So a pod cannot produce another program's fingerprint
without running that very program, and addresses differ across runs only by ASLR, which the
offsets take out. Words that point elsewhere (heap, anonymous JIT code) are left out. A
crash whose program counter is in no recorded object has no fingerprint and is always
analysed in full.

Matching is only ever among the crashes of one namespace (the catalog's side): whatever a
tenant does to its own fingerprints, it can only land in a group its own crashes made.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import struct

from corevault import objectid
from corevault.analysis.elfcore import Core

#: words read from the stack pointer up (512 bytes on 64-bit machines)
STACK_WORDS = 64
#: how many of them, pointing into objects, make the fingerprint
MAX_ADDRESSES = 16
_SP = {"x86_64": "rsp", "aarch64": "sp"}


def of(core: Core, record: list[dict]) -> str | None:
    """The fingerprint of ``core``'s crash (32 hex digits), or None when it has none."""
    objects = sorted(
        (m["start"], m["end"], f"{m['key']}/{m['sha256']}")
        for m in record
        if isinstance(m.get("start"), int)
        and isinstance(m.get("end"), int)
        and objectid.is_object(m.get("key"), m.get("sha256"))
    )
    starts = [start for start, _, _ in objects]

    def where(address: int) -> str | None:
        i = bisect.bisect_right(starts, address) - 1
        if i >= 0 and address < objects[i][1]:
            return f"{objects[i][2]}+{address - objects[i][0]:x}"
        return None

    crashed = next((t for t in core.threads if t.signal), core.threads[0] if core.threads else None)
    if crashed is None:
        return None
    pc = crashed.pc(core.machine)
    at = where(pc) if pc is not None else None
    if at is None:
        return None
    places = [at]
    sp = crashed.registers.get(_SP.get(core.machine, ""))
    stack = core.read_memory(sp, STACK_WORDS * 8) if sp is not None else None
    for (word,) in struct.iter_unpack("<Q", (stack or b"")[: len(stack or b"") // 8 * 8]):
        place = where(word)
        if place is not None:
            places.append(place)
            if len(places) > MAX_ADDRESSES:
                break
    doc = [core.signal, core.signal_code, places]
    return hashlib.sha256(json.dumps(doc).encode()).hexdigest()[:32]
