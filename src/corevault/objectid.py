"""How a mapped ELF object is named: a key to look it up by, and its content as its identity.

A build-id is a claim the file makes about itself; any tenant can write any build-id into
a file it controls. So every stored object has two names:

- its **key**, what tools look it up by: the GNU build-id (hex) where the file has one;
  ``go-<hex>`` (SHA-256 of Go's ``.note.go.buildid``, cut to 40 digits) for Go binaries
  built without a GNU build-id; ``sha256-<hex>`` of the content for anything else;
- its **content hash** (SHA-256 of the bytes the process really mapped, read through
  ``/proc/PID/map_files`` at crash time): the identity. Stores keep
  ``buildid/<key>/<sha256>``, so identical files are kept once, and two files that claim
  one key are two entries, never one overwriting the other.

A crash's record names the key and content hash of every object its process mapped; the
analysis, the vault and the debuginfod endpoint resolve a crash's objects through that
record, never through a global "whoever claimed this build-id first".
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing.TYPE_CHECKING would import typing, which the crash path never loads
if TYPE_CHECKING:
    import re

    KEY: re.Pattern[str]
    SHA256: re.Pattern[str]

GO_PREFIX = "go-"
CONTENT_PREFIX = "sha256-"
#: ``KEY``: a key as stores and URLs accept it (never a path: no ``/``, no ``..``); ``\Z``, not
#: ``$``, which would let a trailing newline through. ``SHA256``: a content hash.
_PATTERNS = {"KEY": r"^(?:go-|sha256-)?[0-9a-f]{8,80}\Z", "SHA256": r"^[0-9a-f]{64}\Z"}


def __getattr__(name: str) -> re.Pattern[str]:
    """``KEY`` and ``SHA256``, compiled on first use: the capture handler imports this module
    but matches no key, and importing ``re`` would cost it ~7 ms of every crash."""
    if name not in _PATTERNS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import re

    globals()[name] = compiled = re.compile(_PATTERNS[name])
    return compiled


def go_key(go_build_id: str) -> str:
    """The key of a Go binary that has no GNU build-id."""
    from corevault import hashing

    return GO_PREFIX + hashing.sha256_hex(go_build_id.encode())[:40]


def key_for(build_id: str | None, go_build_id: str | None, sha256: str | None) -> str | None:
    """The key an object is stored and looked up by: GNU build-id, else Go's, else its content."""
    if build_id:
        return build_id
    if go_build_id:
        return go_key(go_build_id)
    return CONTENT_PREFIX + sha256 if sha256 else None


def is_object(key: object, sha256: object) -> bool:
    """Whether a crash record names a stored object validly (a key and a content hash)."""
    if not (isinstance(key, str) and isinstance(sha256, str)):
        return False
    return bool(__getattr__("KEY").match(key) and __getattr__("SHA256").match(sha256))


def kind(key: str) -> str:
    """What a key is made of, in words for reports: build-id, Go build id, or content hash."""
    if key.startswith(GO_PREFIX):
        return "Go build id"
    if key.startswith(CONTENT_PREFIX):
        return "content hash"
    return "build-id"
