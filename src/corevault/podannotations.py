"""The pod annotations corevault reads, and the one rule for which core-pattern key wins.

A pod asks for cores with ``corevault.io/core-pattern`` or, so that the manifests of
Alibaba Cloud ACS's core dump guide work unchanged, ``alibabacloud.com/core-pattern``.
The capture handler, the admission webhook and ``kubectl corevault debug`` must agree on
what a pod asked for, so all of them call :func:`core_pattern`:

- an empty or blank value counts as not set (a template that renders an empty string
  must not turn the other key off);
- when both keys are set, corevault's own key wins, whatever the other one says. Its value
  is used even when it is invalid, so a mistake in it is refused where it can be seen,
  never silently replaced by the other key's pattern.

The crash path imports this module: it holds constants and one function, nothing more.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing.TYPE_CHECKING would import typing, which the crash path never loads
if TYPE_CHECKING:
    from collections.abc import Mapping

PATTERN = "corevault.io/core-pattern"
PATTERN_ACS = "alibabacloud.com/core-pattern"
#: "volume", "vault" or both, comma-separated: narrows the node's targets for the pod
TARGETS = "corevault.io/targets"
#: a size ("512M"): the pod's cores are cut there and marked truncated
MAX_SIZE = "corevault.io/max-core-size"
#: what the webhook mounts at the pattern's directory (emptydir, pvc:CLAIM, nfs:…, oss:BUCKET…)
VOLUME = "corevault.io/volume"

# The core-pattern keys, the winner first.
PATTERN_KEYS = (PATTERN, PATTERN_ACS)


def core_pattern(annotations: Mapping[str, str]) -> tuple[str, str] | None:
    """The key and value of the pod's core pattern, or None when the pod asks for no cores."""
    for key in PATTERN_KEYS:
        value = annotations.get(key)
        if isinstance(value, str) and value.strip():
            return key, value
    return None
