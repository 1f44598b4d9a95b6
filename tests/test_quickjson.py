"""quickjson gives json's own text and values, and json's errors, on every input.

The handler writes every record with it, so a difference would be a record that the agent,
the catalog or a person reads differently from what was meant.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import corevault
from corevault import quickjson

# every str: surrogates, control characters, non-ASCII, quotes and backslashes
TEXT = st.text(st.characters(exclude_categories=(), min_codepoint=0, max_codepoint=0x10FFFF))
SCALARS = (
    st.none() | st.booleans() | st.integers() | st.integers(min_value=-(10**40), max_value=10**40)
    | st.floats(allow_nan=True, allow_infinity=True) | TEXT
)  # fmt: skip
KEYS = TEXT | st.integers() | st.floats() | st.booleans() | st.none()
VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=6) | st.tuples(inner, inner) | st.dictionaries(KEYS, inner, max_size=6)
    ),
    max_leaves=40,
)


def same(a: object, b: object) -> bool:
    """Equal as JSON values, NaN included (NaN != NaN)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


@settings(max_examples=200, deadline=None)
@given(VALUES, st.booleans())
def test_dumps_is_json_dumps_text(value: object, sort_keys: bool) -> None:
    try:
        expected = json.dumps(value, sort_keys=sort_keys)
    except TypeError as e:  # sort_keys over keys of mixed types
        with pytest.raises(TypeError) as got:
            quickjson.dumps(value, sort_keys=sort_keys)
        assert str(got.value) == str(e)
        return
    assert quickjson.dumps(value, sort_keys=sort_keys) == expected


@settings(max_examples=200, deadline=None)
@given(VALUES, st.sampled_from(["", " ", "\n", " \t\r\n"]))
def test_loads_reads_what_json_reads(value: object, pad: str) -> None:
    text = pad + json.dumps(value) + pad
    assert same(quickjson.loads(text), json.loads(text))
    raw = text.encode("utf-8", "surrogatepass")
    assert same(quickjson.loads(raw), json.loads(raw))
    assert same(quickjson.loads(bytearray(raw)), json.loads(raw))


def outcome(f, data):
    try:
        return "value", json.dumps(f(data), sort_keys=True)
    except (ValueError, TypeError) as e:  # UnicodeDecodeError and JSONDecodeError included
        return type(e).__name__, str(e)


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        TEXT,
        st.binary(max_size=40),
        st.builds(
            lambda v, junk: json.dumps(v) + junk, VALUES, st.sampled_from(["", "x", "]", " 1", "\0", "}"])
        ),
        st.sampled_from(
            ["NaN", "-Infinity", "[1,]", '{"a" 1}', "\ufeff{}", '"\\ud800"', "1e999", "01", "-", " "]
        ),
        st.builds(
            lambda s, enc: s.encode(enc),
            st.sampled_from(['{"a": [1, 2.5]}', '"\u00e9"']),
            st.sampled_from(["utf-8-sig", "utf-16", "utf-16-le", "utf-16-be", "utf-32"]),
        ),
    )
)
def test_loads_fails_where_json_fails_with_its_message(data: str | bytes) -> None:
    assert outcome(quickjson.loads, data) == outcome(json.loads, data)


def test_the_constants_and_big_numbers_parse_as_json_parses_them() -> None:
    got = quickjson.loads("[NaN, Infinity, -Infinity, 1e400, 123456789012345678901234567890, -0.0]")
    assert math.isnan(got[0]) and got[1:3] == [math.inf, -math.inf] and got[3] == math.inf
    assert got[4] == 123456789012345678901234567890 and math.copysign(1, got[5]) == -1


def test_an_object_json_cannot_encode_raises_json_s_error() -> None:
    with pytest.raises(TypeError, match="Object of type set is not JSON serializable"):
        quickjson.dumps({"a": {1}})
    loop: list = []
    loop.append(loop)
    with pytest.raises(ValueError, match="Circular reference"):
        quickjson.dumps(loop)


def test_it_imports_neither_json_nor_re_and_still_raises_json_s_errors() -> None:
    """Without json imported, the C scanner cannot raise its error (SystemError): json's comes instead."""
    src = os.path.dirname(os.path.dirname(corevault.__file__))
    probe = (
        f"import sys; sys.path.insert(0, {src!r}); import corevault.quickjson as q; "
        "q.loads(q.dumps({'a': [1.5, None, 'é']})); print(sorted({'json', 're', 'enum'} & set(sys.modules)))\n"
        "for bad in ('{half a snapshot', '[1,', '\"x', 'nul', '{\"a\": 1} x', ''):\n"
        "    try:\n        q.loads(bad)\n    except ValueError as e:\n        print(type(e).__name__)"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-S", "-c", probe], capture_output=True, text=True, cwd="/", check=True
    )
    assert out.stdout.split() == ["[]"] + ["JSONDecodeError"] * 6
