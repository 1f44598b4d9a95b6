"""``corevault list | info | dump | groups | rm | gdb`` over a vault filled by the agent."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
import zstandard

from corevault.agent.loop import Agent
from tests.test_vault import CLI, Node, make_node, material  # noqa: F401 - material is a fixture

pytestmark = pytest.mark.crash


@pytest.fixture(scope="module")
def node(material: dict) -> Node:  # noqa: F811
    n = make_node(material)
    Agent(n.settings).run(once=True)
    return n


def cli(node: Node, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CLI, "-c", node.config, *args], capture_output=True, text=True, check=False, timeout=120
    )


def test_list_newest_first_with_filters(node: Node) -> None:
    rows = [json.loads(line) for line in cli(node, "list", "--json").stdout.splitlines()]
    assert len(rows) == 3 and [r["time"] for r in rows] == sorted((r["time"] for r in rows), reverse=True)
    abrt = [json.loads(line) for line in cli(node, "list", "--json", "--signal", "ABRT").stdout.splitlines()]
    assert [r["exe"] for r in abrt] == ["/app/thrower"]
    assert len(cli(node, "list", "--json", "-n", "1").stdout.splitlines()) == 1
    assert cli(node, "list", "--json", "--since", "1d").stdout.count("\n") == 3
    assert cli(node, "list", "--json", "--until", "2001-01-01").stdout == ""
    table = cli(node, "list").stdout
    assert "SIGSEGV in crash_here ← main" in table and "ID" in table


@pytest.mark.parametrize(
    ("args", "code", "words"),
    [
        (["info", "no-such-crash"], 4, "no crash 'no-such-crash'"),
        (["dump", "no-such-crash", "-o", "/tmp/x"], 4, "no crash"),
        (["rm", "no-such-crash"], 4, "no crash"),
        (["gdb", "no-such-crash"], 4, "no crash"),
        (["list", "--since", "yesterday"], 2, "use 30m, 2h, 7d"),
        (["list", "-n", "0"], 2, "-n"),
    ],
)
def test_must_fail(node: Node, args: list[str], code: int, words: str) -> None:
    out = cli(node, *args)
    assert out.returncode == code, out.stderr
    assert words in out.stderr and "Traceback" not in out.stderr


def test_info_shows_the_report(node: Node) -> None:
    crash = json.loads(cli(node, "list", "--json", "--signal", "ABRT").stdout)
    text = cli(node, "info", crash["id"]).stdout
    assert "SIGABRT in parse_config ← main" in text and "thrower.cc" in text and "Modules:" in text
    doc = json.loads(cli(node, "info", "--json", crash["id"]).stdout)
    assert doc["report"]["signature"] == crash["signature"] and doc["meta"]["id"] == crash["id"]


def test_dump_writes_the_plain_core(node: Node, material: dict, tmp_path) -> None:  # noqa: F811
    crash_id = material["ids"][0]
    out = tmp_path / "core"
    result = cli(node, "dump", crash_id, "-o", str(out))
    assert result.returncode == 0, result.stderr
    with open(os.path.join(material["dir"], "ready", crash_id, "core.zst"), "rb") as f:
        expected = zstandard.ZstdDecompressor().stream_reader(f).read()
    assert out.read_bytes() == expected
    assert cli(node, "dump", crash_id, "-o", str(out)).returncode == 1  # no silent overwrite
    assert cli(node, "dump", crash_id, "-o", str(out), "--force").returncode == 0


def test_groups(node: Node) -> None:
    groups = json.loads(cli(node, "groups", "--json").stdout)
    assert sorted(g["count"] for g in groups) == [1, 2]


def test_gdb_batch_after_the_image_is_gone(node: Node) -> None:
    """Only the vault's copies of the binaries are left: the node's store and the image are gone."""
    shutil.rmtree(node.settings.buildid_dir)
    crash = json.loads(cli(node, "list", "--json", "--signal", "ABRT").stdout)
    out = cli(node, "gdb", crash["id"], "--batch", "--", "-ex", "bt")
    assert out.returncode == 0, out.stderr
    frames = [line for line in out.stdout.splitlines() if line.startswith("#")]
    assert any(" parse_config (" in f for f in frames) and any(" main (" in f for f in frames), frames
    assert (
        "Using host libthread_db" not in out.stdout + out.stderr
    )  # no thread library is loaded, not even the host's


def test_rm_forgets_a_crash(node: Node, material: dict) -> None:  # noqa: F811
    victim = material["ids"][-1]
    assert cli(node, "rm", victim).returncode == 0
    assert cli(node, "info", victim).returncode == 4
    assert victim not in cli(node, "list", "--json").stdout


@pytest.mark.parametrize(
    ("setting", "words"),
    [
        ('catalog = "mysql://x/y"', "is not usable"),
        ('catalog = "notaurl"', "is not usable"),
        ('store = "ftp://x"', "use file:///path, s3://bucket/prefix, gs://bucket/prefix, az://container/prefix"),
    ],
)
def test_bad_vault_settings_are_one_line(tmp_path, setting: str, words: str) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'state_dir = "{tmp_path}/s"\n[vault]\n{setting}\n')
    out = subprocess.run([CLI, "-c", str(cfg), "list"], capture_output=True, text=True, check=False)
    assert out.returncode in (1, 2) and words in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
