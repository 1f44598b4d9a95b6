"""Real crashes in real runc containers, through the real kernel and the installed handler."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import stat
from pathlib import Path

import pytest
import zstandard

from corevault import spool
from corevault.hostsetup import SYSCTLS, write_sysctl
from testbed import runc
from tests.conftest import Capture, gdb_backtrace
from tests.tenants import held_handler

pytestmark = pytest.mark.crash

SEED = {"alibabacloud.com/core-pattern": "/data/dump-a/core-%E-%p-%t"}
# Every specifier whose value is the same in two crashes of PID 1 of a container.
STABLE = "/data/dump-a/core-%E-%p-%i-%u-%g-%s-%d-%h-%e-%f-%c-%%"


def sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def kernel_file_mode_name(capture: Capture, rootfs: str, pattern: str, args: list[str], tmp_path) -> str:
    """Let the kernel itself write a core with ``pattern`` (file mode) and return its name."""
    volume = tmp_path / "kernel-volume"
    volume.mkdir()
    ours = Path("/proc/sys/kernel/core_pattern").read_text().rstrip("\n")
    write_sysctl(SYSCTLS["core_pattern"], pattern)
    try:
        runc.Container(rootfs, args, volume=str(volume)).run()
    finally:
        write_sysctl(SYSCTLS["core_pattern"], ours)
    names = os.listdir(volume)
    assert len(names) == 1, f"the kernel wrote {names}"
    return names[0]


def test_seed_annotation_puts_the_kernels_core_in_the_volume(capture: Capture, rootfs: str, tmp_path) -> None:
    c = capture.crash(rootfs, ["/app/crasher", "segv"], annotations=SEED)
    [name] = capture.volume_files()
    [meta] = capture.entries()
    assert name == f"core-!app!crasher-1-{meta['time']}"
    core = os.path.join(capture.volume, name)
    st = os.stat(core)
    assert stat.S_IMODE(st.st_mode) == 0o600 and (st.st_uid, st.st_gid) == (0, 0)
    assert st.st_size == meta["core"]["size"] > 0
    with open(core, "rb") as f:
        assert f.read(4) == b"\x7fELF"

    bt = gdb_backtrace(os.path.join(rootfs, "app/crasher"), core, rootfs)
    assert re.search(r"#0 .*crash_here", bt), bt
    assert "main" in bt

    assert meta["signal"] == {"number": 11, "name": "SIGSEGV"}
    assert meta["pod"]["uid"] == c.pod_uid and meta["pod"]["container_id"] == c.id
    assert meta["process"]["exe"] == "/app/crasher" and meta["process"]["ns_pid"] == 1
    assert meta["volume"]["path"] == f"/data/dump-a/{name}" and meta["volume"]["written"]
    assert meta["core"]["truncated"] is False and meta["core"]["sha256"] == sha256(core)
    entry = os.path.join(spool.ready_dir(capture.spool), meta["id"])
    with open(os.path.join(entry, spool.CORE_NAME), "rb") as f:
        assert zstandard.ZstdDecompressor().stream_reader(f).read() == Path(core).read_bytes()

    by_path = {m["path"]: m for m in meta["modules"]}
    for path in ("/app/crasher", "/lib/x86_64-linux-gnu/libc.so.6"):
        m = by_path[path]
        held = os.path.join(capture.store, "buildid", m["key"], m["sha256"])
        assert m["key"] == m["build_id"] and sha256(held) == m["sha256"]
        assert m["sha256"] == sha256(os.path.join(rootfs, path.lstrip("/")))
    assert os.listdir(spool.tmp_dir(capture.spool)) == []


def test_core_name_matches_the_kernels_own_for_every_stable_specifier(
    capture: Capture, rootfs: str, tmp_path
) -> None:
    kernel = kernel_file_mode_name(capture, rootfs, STABLE, ["/app/crasher", "segv"], tmp_path)
    capture.crash(rootfs, ["/app/crasher", "segv"], annotations={"corevault.io/core-pattern": STABLE})
    assert capture.volume_files() == [kernel]
    assert kernel.startswith("core-!app!crasher-1-1-0-0-11-1-pod-0-crasher-crasher-18446744073709551615-%")


@pytest.mark.parametrize("comm", ["..", ".", "a/b"])
def test_escaped_process_names_match_the_kernel(capture: Capture, rootfs: str, tmp_path, comm: str) -> None:
    pattern = "/data/dump-a/%e"
    args = ["/app/crasher", "comm", comm]
    kernel = kernel_file_mode_name(capture, rootfs, pattern, args, tmp_path)
    capture.crash(rootfs, args, annotations={"corevault.io/core-pattern": pattern})
    assert capture.volume_files() == [kernel]
    assert kernel in ("!.", "!", "a!b")


def test_without_the_annotation_nothing_is_written(capture: Capture, rootfs: str) -> None:
    capture.crash(rootfs, ["/app/crasher", "segv"])
    assert capture.volume_files() == []
    assert capture.entries() == []
    [record] = capture.journal()
    assert record["event"] == "skipped" and "not opted in" in record["reason"]


def test_an_empty_corevault_pattern_gives_way_to_the_acs_one(capture: Capture, rootfs: str) -> None:
    both = {"corevault.io/core-pattern": "", "alibabacloud.com/core-pattern": "/data/dump-a/acs-%e"}
    capture.crash(rootfs, ["/app/crasher", "segv"], annotations=both)
    assert capture.volume_files() == ["acs-crasher"]


def test_systemd_cgroup_driver_and_pod_index_name_the_pod(capture: Capture, rootfs: str) -> None:
    from corevault import podindex

    c = runc.Container(rootfs, ["/app/crasher", "segv"], volume=capture.volume, driver="systemd")
    podindex.write_pod(
        capture.podindex,
        {
            "uid": c.pod_uid, "namespace": "shop", "name": "cart-7d9f", "node": "node-a",
            "annotations": {"corevault.io/core-pattern": "/data/dump-a/core-%e-%p"},
            "containers": {"cart": {"id": c.id, "image": "registry.example/cart:1.4"}},
        },
    )  # fmt: skip
    assert c.run().returncode != 0
    assert capture.volume_files() == ["core-crasher-1"]
    [meta] = capture.entries()
    assert meta["cgroup"].endswith(f"cri-containerd-{c.id}.scope")
    assert meta["pod"] == {
        "namespace": "shop", "name": "cart-7d9f", "uid": c.pod_uid, "container": "cart",
        "container_id": c.id, "image": "registry.example/cart:1.4", "source": "podindex",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("mode", "dump_mode", "owner"),
    [
        (
            "dumpable",
            1,
            33,
        ),  # a worker that dropped to www-data but stayed dumpable, like nginx: its own core
        ("dropuid", 2, 0),  # a process that changed credentials: root-only, never readable by the user
    ],
)
def test_core_owner_follows_the_dump_mode(
    capture: Capture, rootfs: str, mode: str, dump_mode: int, owner: int
) -> None:
    uid = 33 if mode == "dumpable" else 1000
    capture.crash(
        rootfs, ["/app/crasher", mode, str(uid)], annotations={"corevault.io/core-pattern": "/data/dump-a/c"}
    )
    st = os.stat(os.path.join(capture.volume, "c"))
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (owner, owner, 0o600)
    [meta] = capture.entries()
    assert meta["process"]["dump_mode"] == dump_mode and meta["process"]["uid"] == uid


def test_crash_in_a_worker_thread_records_the_thread(capture: Capture, rootfs: str, tmp_path) -> None:
    capture.crash(
        rootfs, ["/app/crasher", "thread"], annotations={"corevault.io/core-pattern": "/data/dump-a/c-%p-%i"}
    )
    [meta] = capture.entries()
    assert meta["process"]["ns_pid"] == 1 and meta["process"]["ns_tid"] > 1
    assert capture.volume_files() == [f"c-1-{meta['process']['ns_tid']}"]
    bt = gdb_backtrace(
        os.path.join(rootfs, "app/crasher"), os.path.join(capture.volume, capture.volume_files()[0]), rootfs
    )
    assert "crash_here" in bt and "worker_crash" in bt


def test_uncaught_cxx_exception_is_captured_as_sigabrt(capture: Capture, rootfs: str) -> None:
    capture.crash(rootfs, ["/bin/sh", "-c", "/app/thrower; exit 1"], annotations=SEED)
    [meta] = capture.entries()
    assert meta["signal"]["name"] == "SIGABRT" and meta["process"]["exe"] == "/app/thrower"
    assert capture.volume_files() == [f"core-!app!thrower-{meta['process']['ns_pid']}-{meta['time']}"]


def test_rlimit_core_cuts_the_core_and_says_so(capture: Capture, rootfs: str) -> None:
    capture.crash(rootfs, ["/app/crasher", "segv"], annotations=SEED, rlimit_core=(65536, 1 << 30))
    [name] = capture.volume_files()
    assert os.path.getsize(os.path.join(capture.volume, name)) == 65536
    [meta] = capture.entries()
    assert meta["core"]["truncated"] is True and meta["core"]["limit_source"] == "RLIMIT_CORE"
    assert any(r["event"] == "truncated" and "65536" in r["reason"] for r in capture.journal())


def test_per_pod_size_cap_annotation(capture: Capture, rootfs: str) -> None:
    capture.crash(
        rootfs, ["/app/crasher", "segv"], annotations={**SEED, "corevault.io/max-core-size": "128K"}
    )
    [name] = capture.volume_files()
    assert os.path.getsize(os.path.join(capture.volume, name)) == 128 << 10
    assert capture.entries()[0]["core"]["limit_source"] == "corevault.io/max-core-size"


def test_rlimit_core_zero_refuses_the_dump(capture: Capture, rootfs: str) -> None:
    capture.crash(rootfs, ["/app/crasher", "segv"], annotations=SEED, rlimit_core=(0, 0))
    assert capture.volume_files() == [] and capture.entries() == []
    [record] = capture.journal()
    assert record["event"] == "refused" and "RLIMIT_CORE is 0" in record["reason"]


def test_crash_storm_keeps_at_most_the_configured_cores(capture: Capture, rootfs: str) -> None:
    capture.configure("[capture]\nstorm_max = 2\nstorm_window = 600\n")
    cid, uid = runc.new_container_id(), runc.new_pod_uid()
    for _ in range(4):
        capture.crash(rootfs, ["/app/crasher", "segv"], annotations=SEED, id=cid, pod_uid=uid)
    assert len(capture.entries()) == 2
    dropped = [r for r in capture.journal() if r["event"] == "dropped"]
    assert len(dropped) == 2 and all("crash storm" in r["reason"] for r in dropped)


def test_pod_can_turn_the_volume_copy_off(capture: Capture, rootfs: str) -> None:
    capture.crash(rootfs, ["/app/crasher", "segv"], annotations={**SEED, "corevault.io/targets": "vault"})
    assert capture.volume_files() == []
    assert len(capture.entries()) == 1


def test_node_can_turn_the_vault_copy_off(capture: Capture, rootfs: str) -> None:
    capture.configure('[capture]\ntargets = ["volume"]\n')
    capture.crash(rootfs, ["/app/crasher", "segv"], annotations=SEED)
    assert len(capture.volume_files()) == 1
    assert capture.entries() == []


def test_full_spool_drops_the_vault_copy_but_not_the_volume_copy(capture: Capture, rootfs: str) -> None:
    capture.configure('[spool]\nmax_size = "1K"\n')
    capture.crash(rootfs, ["/app/crasher", "segv"], annotations=SEED)
    assert len(capture.volume_files()) == 1
    assert capture.entries() == []
    assert any(r["event"] == "dropped" and "spool is full" in r["reason"] for r in capture.journal())


def test_handler_stops_reading_a_core_that_has_nowhere_left_to_go(capture: Capture, rootfs: str) -> None:
    """A pod's core whose only copy failed is not read to its end: the handler lets go of it."""
    capture.configure('[spool]\nmax_size = "1K"\n')
    annotations = {**SEED, "corevault.io/targets": "vault"}
    capture.crash(rootfs, ["/app/crasher", "noise", str(64 << 10)], annotations=annotations)
    [dropped] = [r for r in capture.journal() if r["event"] == "dropped"]
    assert "spool is full" in dropped["reason"]
    # the vault copy fails within its first frame (4 MiB); the core holds 64 MiB of noise
    assert dropped["size"] < 16 << 20, dropped
    assert not [r for r in capture.journal() if r["event"] == "truncated"], "the kernel did not cut it"
    assert capture.entries() == [] and capture.volume_files() == []


def test_handler_memory_stays_flat_on_a_core_of_hundreds_of_mib(capture: Capture, rootfs: str) -> None:
    """The core is streamed, never held: a 300 MiB process costs the handler no more than a small one."""
    capture.crash(rootfs, ["/app/crasher", "alloc", "300"], annotations=SEED)
    [name] = capture.volume_files()
    [meta] = capture.entries()
    assert meta["core"]["size"] > 300 << 20 and not meta["core"]["truncated"]
    assert meta["handler_max_rss_kib"] < 32 << 10, f"handler peak RSS {meta['handler_max_rss_kib']} KiB"
    # Both copies hold the whole core: the plain one (sparse) and the compressed one.
    volume_core = os.path.join(capture.volume, name)
    assert os.path.getsize(volume_core) == meta["core"]["size"]
    assert sha256(volume_core) == meta["core"]["sha256"]


def test_a_process_killed_mid_dump_leaves_an_entry_marked_cut_whose_hash_is_its_bytes(
    capture: Capture, rootfs: str
) -> None:
    """The pod's process is SIGKILLed while its core streams (the handler held still mid-read,
    the kernel blocked on the full pipe): the kernel stops writing, the handler lets the process
    go and finishes on its threads. The entry is whole as a file (every frame closed, its seek
    table last) and says what it is: cut by the kernel, at its size, with the size the headers
    promised, and the SHA-256 of exactly the bytes it holds."""
    c = runc.Container(rootfs, ["/app/crasher", "alloc", "256"], volume=capture.volume, annotations=SEED)
    tmp = spool.tmp_dir(capture.spool)
    with held_handler(
        capture.handler, c.run, reading=True, ready=lambda: os.path.isdir(tmp) and bool(os.listdir(tmp))
    ) as held:
        assert held, "the handler ended before it could be held mid-read"
        [entry] = os.listdir(tmp)
        crasher = int(entry.split("-")[1])  # the entry's id names the crashed process
        os.kill(crasher, signal.SIGKILL)  # pending at once: the kernel's next write stops the dump
    [meta] = capture.entries()
    core = meta["core"]
    assert core["truncated"] and core["cut_by"] == "kernel" and core["expected_size"] > core["size"], core
    assert 0 < core["size"] < 256 << 20
    with open(os.path.join(spool.ready_dir(capture.spool), meta["id"], spool.CORE_NAME), "rb") as f:
        plain = zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True).read()
    assert len(plain) == core["size"] and hashlib.sha256(plain).hexdigest() == core["sha256"]
    [cut] = [r for r in capture.journal() if r["event"] == "truncated"]
    assert "the kernel stopped the dump" in cut["reason"]
    assert os.listdir(tmp) == []
