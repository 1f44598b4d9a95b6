"""What the handler does with one crash (:mod:`corevault.capture.policy`): opt-in, targets,
size limits, tenants' dump slots and the crash-storm budget. Pods control every annotation
and every name these functions see."""

from __future__ import annotations

import json
import os
import threading

import pytest

from corevault import podannotations
from corevault.capture import policy
from corevault.capture.lookup import Owner
from corevault.capture.process import Crash
from corevault.config import Settings

UNLIMITED = str((1 << 64) - 1)


def crash(**values: str) -> Crash:
    base = {"P": "4242", "p": "7", "i": "7", "I": "4242", "s": "11", "t": "1700000000", "d": "1", "u": "0",
            "g": "0", "c": UNLIMITED, "C": "0", "h": "web-1", "e": "server", "f": "server", "E": "!app!server"}  # fmt: skip
    return Crash(base | values)


def owner(annotations: dict[str, str], **fields: str) -> Owner:
    o = Owner("podindex", annotations)
    for k, v in fields.items():
        setattr(o, k, v)
    return o


def plan(
    annotations: dict[str, str],
    c: Crash | None = None,
    settings: Settings | None = None,
    uses_pid: bool = False,
) -> policy.Plan:
    return policy.plan(c or crash(), owner(annotations), settings or Settings(), uses_pid)


PATTERN = {podannotations.PATTERN: "/data/dump-a/core-%e-%p-%t"}


def test_no_annotation_is_no_opt_in() -> None:
    p = plan({"app": "web"})
    assert not p.opted_in and p.refused is not None and "not opted in" in p.refused
    assert p.volume_path is None and not p.vault


def test_an_opted_in_crash_goes_to_both_targets_at_the_kernels_name() -> None:
    p = plan(PATTERN)
    assert p.opted_in and p.refused is None and p.warnings == []
    assert p.pattern == PATTERN[podannotations.PATTERN]
    assert p.volume_path == "/data/dump-a/core-server-7-1700000000" and p.vault
    assert p.limit is None and p.limit_source is None


def test_core_uses_pid_appends_the_pid_only_when_the_pattern_has_none() -> None:
    assert plan({podannotations.PATTERN: "/data/core"}, uses_pid=True).volume_path == "/data/core.7"
    assert plan(PATTERN, uses_pid=True).volume_path == "/data/dump-a/core-server-7-1700000000"


@pytest.mark.parametrize("bad", ["core-%p", "/data/../etc/core", "|/bin/sh -c evil", "/data/%"])
def test_an_invalid_pattern_is_refused_and_named(bad: str) -> None:
    p = plan({podannotations.PATTERN: bad})
    assert p.opted_in and p.refused is not None and p.refused.startswith(f"invalid {podannotations.PATTERN} ")
    assert p.volume_path is None and not p.vault


def test_the_acs_key_opts_in_too() -> None:
    p = plan({podannotations.PATTERN_ACS: "/data/dump-a/core-%p"})
    assert p.refused is None and p.volume_path == "/data/dump-a/core-7"


def test_a_name_from_the_process_cannot_climb_out_of_the_pattern_directory() -> None:
    # comm and the executable's path are the process's: the kernel's escaping turns / into !
    p = plan({podannotations.PATTERN: "/data/core-%e-%E"}, crash(e="../../etc", E="!..!..!etc!passwd"))
    assert p.volume_path is not None and os.path.dirname(p.volume_path) == "/data"


@pytest.mark.parametrize(
    ("targets", "volume", "vault"),
    [
        ("vault", False, True),
        ("volume", True, False),
        (" volume , vault ", True, True),
        ("vault,vault", False, True),
    ],
)
def test_the_pod_narrows_its_targets(targets: str, volume: bool, vault: bool) -> None:
    p = plan(PATTERN | {podannotations.TARGETS: targets})
    assert p.refused is None and (p.volume_path is not None) == volume and p.vault == vault


def test_the_pod_cannot_widen_the_nodes_targets() -> None:
    settings = Settings()
    settings.targets = frozenset({"vault"})
    p = plan(PATTERN | {podannotations.TARGETS: "volume,vault"}, settings=settings)
    assert p.volume_path is None and p.vault
    p = plan(PATTERN | {podannotations.TARGETS: "volume"}, settings=settings)
    assert p.refused == "every target is turned off for this process"


@pytest.mark.parametrize("targets", ["floppy", "volume,\x1b[2J", "vault;rm -rf /"])
def test_a_bad_targets_value_warns_and_keeps_the_nodes_targets(targets: str) -> None:
    p = plan(PATTERN | {podannotations.TARGETS: targets})
    assert p.refused is None and p.volume_path is not None and p.vault
    assert len(p.warnings) == 1 and "using the node's targets" in p.warnings[0]


def test_rlimit_core_zero_refuses_and_a_limit_cuts() -> None:
    p = plan(PATTERN, crash(c="0"))
    assert p.refused is not None and "RLIMIT_CORE is 0" in p.refused
    p = plan(PATTERN, crash(c="4096"))
    assert (p.limit, p.limit_source) == (4096, "RLIMIT_CORE")


@pytest.mark.parametrize(
    ("rlimit", "max_size", "expected"),
    [
        (UNLIMITED, "512M", (512 << 20, podannotations.MAX_SIZE)),
        ("1048576", "512M", (1 << 20, "RLIMIT_CORE")),  # the smaller wins
        (str(1 << 30), "1M", (1 << 20, podannotations.MAX_SIZE)),
    ],
)
def test_the_smaller_of_rlimit_and_the_pods_cap_wins(rlimit: str, max_size: str, expected: tuple) -> None:
    p = plan(PATTERN | {podannotations.MAX_SIZE: max_size}, crash(c=rlimit))
    assert (p.limit, p.limit_source) == expected and p.refused is None


@pytest.mark.parametrize("max_size", ["lots", "-5M", "1.5G", "9" * 400 + "Q"])
def test_a_bad_size_cap_warns_and_never_costs_the_core(max_size: str) -> None:
    p = plan(PATTERN | {podannotations.MAX_SIZE: max_size})
    assert p.refused is None and p.limit is None and p.vault
    assert len(p.warnings) == 1 and "no per-pod size cap applied" in p.warnings[0]


HOSTILE = "../../" + "a/" * 200 + "\x00\n;`$(id)` é"


def _safe(key: str) -> bool:
    return (
        len(key) <= 102 and all(c.isascii() and (c.isalnum() or c in "-_.") for c in key) and "/" not in key
    )


def test_storm_keys_are_per_container_else_per_executable_and_safe_file_names() -> None:
    c = crash()
    assert policy.storm_key(owner({}, container_id="abc123"), c) == "c-abc123"
    assert policy.storm_key(owner({}), c) == "e-_app_server"
    for key in (
        policy.storm_key(owner({}, container_id=HOSTILE), c),
        policy.storm_key(owner({}), crash(E=HOSTILE)),
    ):
        assert _safe(key) and key[2:] != "." and key[2:] != ".."


def test_tenant_keys_name_the_pod_and_the_namespace() -> None:
    assert policy.tenant_keys(owner({}, uid="u-1", container_id="c", namespace="shop")) == ("p-u-1", "n-shop")
    assert policy.tenant_keys(owner({}, container_id="c1")) == ("c-c1", None)
    assert policy.tenant_keys(owner({})) == (None, None)  # the node's own processes count against no tenant
    pod, ns = policy.tenant_keys(owner({}, uid=HOSTILE, namespace=HOSTILE))
    assert pod is not None and ns is not None and _safe(pod) and _safe(ns)


def test_dump_slots_are_a_share_per_key_and_come_back_when_closed(tmp_path) -> None:
    state = str(tmp_path)
    held = [policy.take_slot(state, "p-a", 2) for _ in range(2)]
    assert all(fd is not None for fd in held)
    assert policy.take_slot(state, "p-a", 2) is None  # the third dump of this pod waits for none: refused
    other = policy.take_slot(state, "p-b", 2)
    assert other is not None  # another pod's share is untouched
    os.close(held[0])  # type: ignore[arg-type]
    again = policy.take_slot(state, "p-a", 2)
    assert again is not None
    assert policy.take_slot(state, "p-a", 0) is None
    for fd in (held[1], other, again):
        os.close(fd)  # type: ignore[arg-type]


def test_a_slot_file_planted_as_a_symlink_is_not_followed(tmp_path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep")
    os.makedirs(tmp_path / "dumps")
    os.symlink(victim, tmp_path / "dumps" / "p-a.0")
    with pytest.raises(OSError):
        policy.take_slot(str(tmp_path), "p-a", 1)
    assert victim.read_text() == "keep"


def test_the_storm_budget_keeps_limit_crashes_per_window(tmp_path) -> None:
    state, t = str(tmp_path), 1_000_000.0
    assert [policy.admit(state, "c-x", 2, 600, t + i) for i in range(4)] == [
        (True, 1),
        (True, 2),
        (False, 3),
        (False, 4),
    ]
    assert policy.admit(state, "c-y", 2, 600, t) == (True, 1)  # budgets are per key
    # once the kept crashes leave the window, crashes are kept again; the count is of the window only
    assert policy.admit(state, "c-x", 2, 600, t + 601) == (True, 3)


@pytest.mark.parametrize(
    "garbage",
    [
        b"not json",
        b'{"kept": "no", "seen": {"a": 1}}',
        b'{"kept": [null, "1", true, 1e400], "seen": [[]]}',
        b"[1, 2]",
        b"\xff\xfe",
    ],
)
def test_a_damaged_storm_file_is_read_as_no_crashes(tmp_path, garbage: bytes) -> None:
    os.makedirs(tmp_path / "storm")
    (tmp_path / "storm" / "c-x").write_bytes(garbage)
    assert policy.admit(str(tmp_path), "c-x", 1, 600, 1000.0) == (True, 1)
    assert policy.admit(str(tmp_path), "c-x", 1, 600, 1001.0) == (False, 2)


def test_the_storm_file_stays_bounded_under_a_flood(tmp_path) -> None:
    """A budget in the first format (JSON) is taken over: its 50,000 times are cut to the newest
    10,000, and the file stays that size however many crashes follow."""
    os.makedirs(tmp_path / "storm")
    (tmp_path / "storm" / "c-x").write_text(
        json.dumps({"kept": [], "seen": [float(i) for i in range(50_000)]})
    )
    assert policy.admit(str(tmp_path), "c-x", 5, 1e9, 1e6) == (True, 10_000)
    for i in range(1, 20_001):
        kept, seen = policy.admit(str(tmp_path), "c-x", 5, 1e9, 1e6 + i)
    assert (kept, seen) == (False, 10_000)
    bound = 32 + 8 * (policy.STORM_SEEN + 5)
    assert os.path.getsize(tmp_path / "storm" / "c-x") <= bound


def test_the_storm_budget_in_the_first_format_is_carried_over(tmp_path) -> None:
    os.makedirs(tmp_path / "storm")
    (tmp_path / "storm" / "c-x").write_text(
        json.dumps({"kept": [990.0, 995.0], "seen": [990.0, 995.0, 999.0]})
    )
    assert policy.admit(str(tmp_path), "c-x", 2, 600, 1000.0) == (False, 4)
    assert policy.admit(str(tmp_path), "c-x", 2, 600, 1591.0) == (True, 4)  # 990 left the window


def test_a_crash_reads_and_writes_a_few_places_of_its_budget_whatever_the_limit(tmp_path) -> None:
    """A limit of a million (what the benchmarks set) makes no million-slot file: the kept ring is
    written one slot at a time, as far as it is used."""
    for i in range(50):
        assert policy.admit(str(tmp_path), "c-x", 1_000_000, 600, 1000.0 + i) == (True, i + 1)
    assert os.path.getsize(tmp_path / "storm" / "c-x") == 32 + 8 * (policy.STORM_SEEN + 50)


def test_a_changed_limit_keeps_the_newest_kept_crashes(tmp_path) -> None:
    state = str(tmp_path)
    assert [policy.admit(state, "c-x", 4, 600, 1000.0 + i)[0] for i in range(5)] == [True] * 4 + [False]
    # down to 2: the two newest kept crashes (1002, 1003) fill it
    assert policy.admit(state, "c-x", 2, 600, 1010.0) == (False, 6)
    assert policy.admit(state, "c-x", 2, 600, 1602.5) == (True, 4)  # 1002 left, 1003 is still in
    assert policy.admit(state, "c-x", 2, 600, 1602.6) == (False, 5)
    # up to 3: room for one more at once
    assert policy.admit(state, "c-x", 3, 600, 1602.7) == (True, 6)


@pytest.mark.parametrize("cut", [0, 7, 31, 40, 80_040])
def test_a_damaged_or_cut_binary_storm_file_never_costs_a_core(tmp_path, cut: int) -> None:
    state = str(tmp_path)
    for i in range(3):
        policy.admit(state, "c-x", 3, 600, 1000.0 + i)
    path = tmp_path / "storm" / "c-x"
    data = bytearray(path.read_bytes())
    with open(path, "r+b") as f:
        f.truncate(cut)
    # what was cut off reads as long gone: a lost header is a fresh budget, lost times free slots
    kept, seen = policy.admit(state, "c-x", 3, 600, 1100.0)
    assert (kept, seen) == (True, 1) if cut < 32 else seen <= 4 and (kept or cut > 80_032)
    # counts that point past the rings, and times that are not numbers, read as no crashes
    data[8:32] = b"\xff" * 24
    path.write_bytes(bytes(data))
    assert policy.admit(state, "c-x", 1, 600, 1200.0) == (True, 1)
    nan = bytearray(path.read_bytes())
    nan[32 : 32 + 8 * 10] = b"\xff\xf8" * 40  # NaN and infinite times where the seen ring is
    path.write_bytes(bytes(nan))
    assert policy.admit(state, "c-x", 1, 600, 1300.0)[1] <= 2


def test_parallel_handlers_of_one_container_share_one_budget(tmp_path) -> None:
    results: list[bool] = []
    lock = threading.Lock()

    def one() -> None:
        kept, _ = policy.admit(str(tmp_path), "c-x", 5, 600, 1000.0)
        with lock:
            results.append(kept)

    threads = [threading.Thread(target=one) for _ in range(20)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert results.count(True) == 5 and len(results) == 20
