"""The one rule for which core-pattern annotation a pod asked with."""

from __future__ import annotations

import pytest

from corevault.podannotations import PATTERN, PATTERN_ACS, core_pattern

OURS, ACS = "/cores/ours-%p", "/data/dump-a/core-%E-%p-%t"


@pytest.mark.parametrize(
    ("annotations", "expected"),
    [
        ({}, None),
        ({"team": "shop"}, None),
        ({PATTERN: OURS}, (PATTERN, OURS)),
        ({PATTERN_ACS: ACS}, (PATTERN_ACS, ACS)),
        ({PATTERN: OURS, PATTERN_ACS: ACS}, (PATTERN, OURS)),
        ({PATTERN: "", PATTERN_ACS: ACS}, (PATTERN_ACS, ACS)),
        ({PATTERN: " \t\n", PATTERN_ACS: ACS}, (PATTERN_ACS, ACS)),
        ({PATTERN: OURS, PATTERN_ACS: ""}, (PATTERN, OURS)),
        ({PATTERN: "", PATTERN_ACS: "  "}, None),
        # corevault's key wins even when its value is unusable: the mistake is refused where it shows
        ({PATTERN: "relative/core", PATTERN_ACS: ACS}, (PATTERN, "relative/core")),
    ],
)
def test_blank_values_are_absent_and_corevaults_key_wins(annotations: dict, expected: object) -> None:
    assert core_pattern(annotations) == expected
