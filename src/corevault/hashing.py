"""SHA-256 from whichever implementation costs the capture handler less for what it hashes.

Two give the same digest at very different costs (measured here with
``python -X importtime`` and 8 MiB hashed in a loop, CPU with SHA-NI):

- OpenSSL's, behind ``hashlib.sha256``: ~1 GB/s, but loading libcrypto costs ~3 ms of CPU,
  which is a fifth of everything the handler may spend on a small crash;
- CPython's own (``_sha256``, ``_sha2`` from 3.12 on): ~90 MB/s, loaded in ~0.3 ms.

So data known to be at most :data:`SMALL` bytes (a small core, a fingerprint, a Go build
id) is hashed by CPython's own, anything larger or of unknown size by OpenSSL's. Where the
built-in one is missing, OpenSSL's is used throughout.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing.TYPE_CHECKING would import typing, which the crash path never loads
if TYPE_CHECKING:
    from hashlib import _Hash

#: up to this many bytes CPython's own SHA-256 finishes before OpenSSL's is even loaded
SMALL = 64 << 10


def sha256(size: int | None = None) -> _Hash:
    """A new SHA-256 object, from the implementation that is cheaper for ``size`` bytes (None: unknown)."""
    if size is not None and size <= SMALL:
        try:
            from _sha256 import sha256 as builtin  # CPython 3.11
        except ImportError:
            try:
                from _sha2 import sha256 as builtin  # CPython 3.12 and later
            except ImportError:
                builtin = None
        if builtin is not None:
            return builtin()
    import hashlib

    return hashlib.sha256()


def sha256_hex(data: bytes) -> str:
    """The SHA-256 of ``data``, in hex."""
    h = sha256(len(data))
    h.update(data)
    return h.hexdigest()
