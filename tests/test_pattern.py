"""core(5) patterns: the kernel's expansion and escaping rules, and the pod validator."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from corevault import pattern

VALUES = {
    "p": "1", "P": "4242", "i": "7", "I": "4248", "u": "33", "g": "33", "d": "1", "s": "11",
    "t": "1700000000", "h": "web-0", "e": "nginx", "E": "/usr/sbin/nginx", "f": "nginx",
    "c": "18446744073709551615", "C": "1", "F": "3",
}  # fmt: skip


def test_seed_pattern_expands_like_the_kernel() -> None:
    assert (
        pattern.expand("/data/dump-a/core-%E-%p-%t", VALUES)
        == "/data/dump-a/core-!usr!sbin!nginx-1-1700000000"
    )


def test_every_specifier() -> None:
    got = pattern.expand("/c/%%-%p-%P-%i-%I-%u-%g-%d-%s-%t-%h-%e-%f-%c-%C", VALUES)
    assert got == "/c/%-1-4242-7-4248-33-33-1-11-1700000000-web-0-nginx-nginx-18446744073709551615-1"


def test_pidfd_only_means_something_for_pipes() -> None:
    assert pattern.expand("/c/x%Fy", VALUES) == "/c/xy"
    assert pattern.expand("|/h %F", VALUES, pipe=True) == "|/h 3"


def test_unknown_specifier_and_trailing_percent_vanish() -> None:
    assert pattern.expand("/c/a%zb%", VALUES) == "/c/ab"


@pytest.mark.parametrize(
    ("value", "escaped"),
    [
        ("..", "!."),
        (".", "!"),
        ("", "!"),
        ("a/b", "a!b"),
        ("/usr/bin/x", "!usr!bin!x"),
        ("...", "..."),
        ("!.", "!."),
    ],
)
def test_escaping_of_names(value: str, escaped: str) -> None:
    assert pattern.escape(value) == escaped
    assert pattern.expand("/c/%e", {**VALUES, "e": value}) == "/c/" + escaped


def test_core_uses_pid_appends_the_pid_unless_the_pattern_has_it() -> None:
    assert pattern.expand("/c/core", VALUES, core_uses_pid=True) == "/c/core.1"
    assert pattern.expand("/c/core-%p", VALUES, core_uses_pid=True) == "/c/core-1"
    assert pattern.expand("/c/core-%P", VALUES, core_uses_pid=True) == "/c/core-4242.1"


@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40))
def test_escaping_is_idempotent_and_never_adds_a_component(value: str) -> None:
    once = pattern.escape(value)
    assert pattern.escape(once) == once
    assert "/" not in once and once not in ("", ".", "..")


@given(st.dictionaries(st.sampled_from(list("heEf")), st.text(max_size=30)))
def test_expansion_keeps_the_patterns_directories(values: dict[str, str]) -> None:
    got = pattern.expand("/data/dump-a/%h/%e-%E-%f", values)
    parts = got.split("/")
    assert parts[:3] == ["", "data", "dump-a"] and len(parts) == 5
    assert all(p not in ("", ".", "..") for p in parts[1:])


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("", "is empty"),
        ("relative/core", "not an absolute path"),
        ("|/bin/sh -c evil", "not a pipe or socket"),
        ("@/run/sock", "not a pipe or socket"),
        ("/data/../etc/core", "'..' component"),
        ("/core-%p", "directly in /"),
        ("/data/" + "x" * 130, "the kernel allows at most 127"),
        ("/data/core-%z", "%z, which the kernel does not know"),
        ("/data/core-%", "lone '%'"),
        ("/data/dump/", "ends with '/'"),
        ("/data/co\nre", "control character"),
    ],
)
def test_validator_names_each_problem(bad: str, message: str) -> None:
    with pytest.raises(pattern.PatternError) as err:
        pattern.check(bad)
    assert message in str(err.value)


def test_validator_reports_every_problem_at_once() -> None:
    found = pattern.problems("rel/../%q%")
    assert len(found) == 4


@pytest.mark.parametrize("good", ["/data/dump-a/core-%E-%p-%t", "/var/crash/%h/core.%%.%e", "/d/core"])
def test_valid_patterns_pass(good: str) -> None:
    assert pattern.check(good) == good


def test_directory_stops_at_the_first_component_with_a_specifier() -> None:
    assert pattern.directory("/data/dump-a/core-%E-%p-%t") == "/data/dump-a"
    assert pattern.directory("/data/%h/core") == "/data"
