"""What names a stored object, a crash's fingerprint and a bucket: exactly the pattern, nothing after it."""

from __future__ import annotations

import pytest

from corevault import fingerprint, objectid
from corevault.errors import UserError
from corevault.kube import buckets

SHA = "ab" * 32


@pytest.mark.parametrize("key", ["0123abcd", "go-" + "f" * 40, "sha256-" + SHA])
def test_keys_and_hashes_as_capture_writes_them_are_objects(key: str) -> None:
    assert objectid.is_object(key, SHA)


@pytest.mark.parametrize(
    ("key", "sha"),
    [("0123abcd\n", SHA), ("0123abcd", SHA + "\n"), ("../0123abcd", SHA), ("0123abcd/x", SHA), ("0123", SHA)],
)
def test_anything_around_a_key_or_hash_is_no_object(key: str, sha: str) -> None:
    assert not objectid.is_object(key, sha)


def test_a_fingerprint_is_exactly_32_hex_digits() -> None:
    assert fingerprint.FORMAT.match("0" * 32)
    assert not fingerprint.FORMAT.match("0" * 32 + "\n")


def test_a_bucket_name_with_a_line_break_is_refused() -> None:
    assert buckets.parse("s3fs:my-bucket:/data") is not None
    with pytest.raises(UserError):
        buckets.parse("s3fs:my-bucket\n:/data")
