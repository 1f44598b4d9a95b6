"""JSON for the crash path: the standard library's own C encoder and scanner, without ``import json``.

``import json`` costs the pipe handler about 10 ms of CPU per crash on this kind of machine
(``json.decoder`` and ``json.encoder`` compile regular expressions at import, which pulls in
``re``, ``enum``, ``functools`` and ``collections``), against 0.2 ms for ``_json``, the C
accelerator that does the actual work inside ``json.dumps`` and ``json.loads``. This module
calls that accelerator the way ``json`` itself does, so the output is the same text and the
parse the same values (a test compares both with ``json`` on generated data and documents).

Only what ``json`` adds around the accelerator is here: the whitespace around a document,
the encoding of bytes, and the checks after the scan. Anything off the common path (an
error, a byte order mark, UTF-16/32 input, an object ``json`` cannot encode, an interpreter
without ``_json``) is handed to ``json`` itself, which then gives its own result or error: so a
broken document costs the import of ``json`` (the handler then journals why), a good one never.
"""

from __future__ import annotations

_WHITESPACE = " \t\n\r"
_CONSTANTS = {"-Infinity": float("-inf"), "Infinity": float("inf"), "NaN": float("nan")}


class _Context:
    """What ``_json.make_scanner`` reads from a ``json.JSONDecoder``, with its defaults."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = _CONSTANTS.__getitem__


try:
    from _json import encode_basestring_ascii as _encode_str
    from _json import make_encoder as _make_encoder
    from _json import make_scanner as _make_scanner

    _scan = _make_scanner(_Context())
except ImportError:  # an interpreter without the accelerator: json's pure-Python code
    _make_encoder = _scan = None  # type: ignore[assignment]


def _not_serializable(o: object) -> object:
    raise TypeError(f"Object of type {o.__class__.__name__} is not JSON serializable")


def dumps(obj: object, *, sort_keys: bool = False) -> str:
    """``json.dumps(obj, sort_keys=sort_keys)``, the same text."""
    if _make_encoder is not None:
        try:
            # json.JSONEncoder.iterencode's call: markers (check_circular), default, str encoder
            # (ensure_ascii), indent, separators, sort_keys, skipkeys, allow_nan
            encode = _make_encoder(
                {}, _not_serializable, _encode_str, None, ": ", ", ", sort_keys, False, True
            )
            return "".join(encode(obj, 0))
        except (TypeError, ValueError, RecursionError):
            pass  # json raises the same, with its own message
    import json

    return json.dumps(obj, sort_keys=sort_keys)


def loads(data: str | bytes | bytearray) -> object:
    """``json.loads(data)``: the same values, the same errors (ValueError)."""
    if _scan is not None:
        text = _text(data)
        if text is not None:
            start = len(text) - len(text.lstrip(_WHITESPACE))
            try:
                obj, end = _scan(text, start)
            # The scanner raises its errors as json.decoder.JSONDecodeError, which it looks up in
            # sys.modules: until json is imported it fails with SystemError instead. Either way
            # json parses the text again and raises its own error.
            except (StopIteration, ValueError, RecursionError, SystemError):
                pass
            else:
                if not text[end:].strip(_WHITESPACE):
                    return obj
    import json

    return json.loads(data)


def _text(data: str | bytes | bytearray) -> str | None:
    """UTF-8 text as ``json.loads`` would decode it; None for what only ``json`` handles."""
    if isinstance(data, str):
        return None if data.startswith("\ufeff") else data
    if not isinstance(data, bytes | bytearray):
        return None
    # json.detect_encoding: a byte order mark, or a NUL among the first four bytes, is UTF-16/32
    if data.startswith((b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff")) or b"\0" in data[:4]:
        return None
    try:
        return data.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        return None
