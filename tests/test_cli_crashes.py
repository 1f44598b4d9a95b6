"""``corevault list | info | dump | groups | rm | gdb`` over a vault the agent filled.

The crashes are the checked-in ones (``fixture_vault``): no root, nothing crashes here. The
commands run in this process (tests/clirun.py), but ``gdb``, which runs gdb.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time

import pytest
import zstandard

from tests.clirun import corevault
from tests.conftest import FIXTURE_SPOOL, FixtureVault
from tests.nodes import CLI


def cli(vault: FixtureVault, *args: str) -> subprocess.CompletedProcess:
    return corevault("-c", vault.node.config, *args)


def cli_child(vault: FixtureVault, *args: str) -> subprocess.CompletedProcess:
    """In a child: ``corevault gdb`` runs gdb, whose output goes to the file descriptors."""
    return subprocess.run(
        [CLI, "-c", vault.node.config, *args], capture_output=True, text=True, check=False, timeout=120
    )


def rows(vault: FixtureVault, *args: str) -> list[dict]:
    return [json.loads(line) for line in cli(vault, "list", "--json", *args).stdout.splitlines()]


def test_list_newest_first_with_filters(fixture_vault: FixtureVault) -> None:
    ids = fixture_vault.ids
    assert [r["id"] for r in rows(fixture_vault)] == [ids["host"], ids["b-lib"], ids["b"], ids["a"]]
    assert [r["exe"] for r in rows(fixture_vault, "--signal", "SEGV")] == ["/app/libuser"]
    assert [r["id"] for r in rows(fixture_vault, "--signal", "SIGFPE")] == [ids["host"], ids["b"], ids["a"]]
    assert rows(fixture_vault, "--signal", "ABRT") == []
    assert [r["id"] for r in rows(fixture_vault, "-n", "1")] == [ids["host"]]
    assert len(rows(fixture_vault, "--since", "1d")) == 4
    # b-lib crashed ten minutes after b (the session's vault may be older than this test)
    b_lib = next(r for r in rows(fixture_vault) if r["id"] == ids["b-lib"])
    minutes = int((time.time() - b_lib["time"]) // 60) + 2
    assert [r["id"] for r in rows(fixture_vault, "--since", f"{minutes}m")] == [ids["host"], ids["b-lib"]]
    assert cli(fixture_vault, "list", "--json", "--until", "2001-01-01").stdout == ""
    table = cli(fixture_vault, "list").stdout
    assert "SIGFPE in divide ← main" in table and "SIGSEGV in crashy_parse ← crashy_entry" in table
    assert "ID" in table


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
def test_must_fail(fixture_vault: FixtureVault, args: list[str], code: int, words: str) -> None:
    out = cli(fixture_vault, *args)
    assert out.returncode == code, out.stderr
    assert words in out.stderr and "Traceback" not in out.stderr


def test_info_shows_the_report(fixture_vault: FixtureVault) -> None:
    (crash,) = rows(fixture_vault, "--signal", "SEGV")
    text = cli(fixture_vault, "info", crash["id"]).stdout
    assert "SIGSEGV in crashy_parse ← crashy_entry" in text and "libcrashy.c:" in text and "Modules:" in text
    assert "parser-b-1" in text and "registry.example/parser:2" in text
    # the C library is not in the fixture: its frames are module+offset, and the report says why
    assert "(libc.so.6+0x" in text and "libc.so.6 (build-id" in text and "is not in the binary store" in text
    doc = json.loads(cli(fixture_vault, "info", "--json", crash["id"]).stdout)
    assert doc["report"]["signature"] == crash["signature"] and doc["meta"]["id"] == crash["id"]


def test_dump_writes_the_plain_core(fixture_vault: FixtureVault, tmp_path) -> None:
    crash_id = fixture_vault.ids["b-lib"]
    (entry,) = (e for e in os.listdir(os.path.join(FIXTURE_SPOOL, "ready")) if "libuser" in _exe(e))
    out = tmp_path / "core"
    result = cli(fixture_vault, "dump", crash_id, "-o", str(out))
    assert result.returncode == 0, result.stderr
    with open(os.path.join(FIXTURE_SPOOL, "ready", entry, "core.zst"), "rb") as f:
        expected = zstandard.ZstdDecompressor().stream_reader(f).read()
    assert out.read_bytes() == expected and expected[:4] == b"\x7fELF"
    assert cli(fixture_vault, "dump", crash_id, "-o", str(out)).returncode == 1  # no silent overwrite
    assert cli(fixture_vault, "dump", crash_id, "-o", str(out), "--force").returncode == 0


def _exe(entry: str) -> str:
    with open(os.path.join(FIXTURE_SPOOL, "ready", entry, "meta.json")) as f:
        return json.load(f)["process"]["exe"]


def test_groups(fixture_vault: FixtureVault) -> None:
    groups = json.loads(cli(fixture_vault, "groups", "--json").stdout)
    assert sorted((g["count"], g["title"]) for g in groups) == [
        (1, "SIGSEGV in crashy_parse ← crashy_entry"),
        (3, "SIGFPE in divide ← main"),
    ]


def test_gdb_batch_after_the_image_is_gone(fixture_vault_copy: FixtureVault) -> None:
    """Only the vault's copies of the binaries are left: the node's store and the image are gone."""
    shutil.rmtree(fixture_vault_copy.node.settings.buildid_dir)
    out = cli_child(fixture_vault_copy, "gdb", fixture_vault_copy.ids["b-lib"], "--batch", "--", "-ex", "bt")
    assert out.returncode == 0, out.stderr
    # gdb shows frame #0 where it stopped, then the whole backtrace
    frames = {line.split()[0]: line for line in out.stdout.splitlines() if line.startswith("#")}
    names = [frames[f"#{n}"].split(" in ")[1].split(" (")[0] for n in range(3)]
    assert names == ["crashy_parse", "crashy_entry", "main"], out.stdout
    assert (
        "Using host libthread_db" not in out.stdout + out.stderr
    )  # no thread library is loaded, not even the host's


def test_rm_forgets_a_crash(fixture_vault_copy: FixtureVault) -> None:
    victim = fixture_vault_copy.ids["b-lib"]
    assert cli(fixture_vault_copy, "rm", victim).returncode == 0
    assert cli(fixture_vault_copy, "info", victim).returncode == 4
    assert victim not in cli(fixture_vault_copy, "list", "--json").stdout
    assert [g["count"] for g in json.loads(cli(fixture_vault_copy, "groups", "--json").stdout)] == [3]


@pytest.mark.parametrize(
    ("setting", "words"),
    [
        ('catalog = "mysql://x/y"', "is not usable"),
        ('catalog = "notaurl"', "is not usable"),
        (
            'catalog = "sqlite:///var/lib/corevault/c.db"',
            "write sqlite:////var/lib/corevault/c.db (four slashes)",
        ),
        (
            'store = "ftp://x"',
            "use file:///path, s3://bucket/prefix, gs://bucket/prefix, az://container/prefix",
        ),
    ],
)
def test_bad_vault_settings_are_one_line(tmp_path, setting: str, words: str) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'state_dir = "{tmp_path}/s"\n[vault]\n{setting}\n')
    out = corevault("-c", str(cfg), "list")
    assert out.returncode in (1, 2) and words in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
