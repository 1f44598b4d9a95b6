"""The agent's process imports the store SDK and the catalog driver its settings name, no other.

Each SDK costs the agent's memory for as long as it runs (boto3 and botocore alone about
25 MiB), and the agent's peak RSS has a goal (``python -m bench.vault``): what is not in use
is imported only where it is used. Checked on a real ``corevault agent --once`` that ships
real spool entries, with the interpreter's own record of every import (``-X importtime``).
"""

from __future__ import annotations

import os
import subprocess
import sys

from corevault import config, spool
from tests.conftest import FIXTURE_SPOOL
from tests.nodes import CLI, Node, make_node
from tests.test_stores import weed  # noqa: F401 - the module's server

#: top-level packages of the stores and the catalog driver not in use with a file store and SQLite,
#: of what runs only in the analysis' worker processes, and rich, which only the CLI's tables use
NOT_IN_USE = (
    "boto3",
    "botocore",
    "s3transfer",
    "obstore",
    "rich",
    "google",
    "azure",
    "psycopg",
    "psycopg2",
    "drgn",
)


def imported(stderr: str) -> set[str]:
    """The modules ``-X importtime`` says were imported."""
    names = set()
    for line in stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip())
    return names


def shipped_once(node: Node, entries: list[str]) -> set[str]:
    """The modules ``agent --once`` imported while it shipped every entry of ``node``'s spool."""
    out = subprocess.run(
        [sys.executable, "-X", "importtime", CLI, "-c", node.config, "agent", "--once"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert spool.entries(node.spool) == [], "the agent did not ship the entries"
    assert {c["id"] for c in node.crashes()} == set(entries)
    return imported(out.stderr)


def test_an_agent_with_a_file_store_and_sqlite_imports_no_cloud_sdk_nor_postgresql_driver() -> None:
    entries = sorted(os.listdir(spool.ready_dir(FIXTURE_SPOOL)))
    node = make_node({"dir": FIXTURE_SPOOL, "ids": entries})
    settings = config.load(node.config)
    assert settings.vault_store.startswith("file:///") and settings.catalog_url.startswith("sqlite:///")
    modules = shipped_once(node, entries)
    assert "corevault.vault.blobs" in modules and "sqlite3" in modules  # the record is complete
    heavy = sorted({m.split(".")[0] for m in modules} & set(NOT_IN_USE))
    assert heavy == [], f"the agent imported what its settings do not use: {heavy}"


def test_an_agent_with_an_s3_store_imports_botocore_and_obstore_but_not_boto3(weed) -> None:  # noqa: F811
    """The S3 store's clients are botocore's own and its single uploads obstore's: boto3's layer
    over botocore (and s3transfer, which it brings) is not imported while nothing goes in parts."""
    entries = sorted(os.listdir(spool.ready_dir(FIXTURE_SPOOL)))
    vault = f'[vault]\nstore = "s3://{weed.bucket}/imports"\n[vault.s3]\nendpoint = "{weed.endpoint}"\naddressing = "path"\n'
    node = make_node({"dir": FIXTURE_SPOOL, "ids": entries}, vault=vault, extra="analyze = false\n")
    modules = shipped_once(node, entries)
    packages = {m.split(".")[0] for m in modules}
    assert {"botocore", "obstore"} <= packages  # the record is complete, the uploads went through obstore
    assert not packages & {"boto3", "s3transfer"}, "the agent imported boto3's layer"
