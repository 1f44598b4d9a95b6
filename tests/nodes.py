"""A node's state for tests: spool entries and build-id files copied in, a vault of its own.

:func:`make_node` takes "material" (a directory with ``ready/<id>/`` spool entries and a
``store/`` of build-id files, and the ids to copy), as the real crashes of the ``material``
fixture in ``tests/test_vault.py`` and the checked-in ``tests/fixtures/spool`` provide it.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass

from corevault import config, spool
from corevault.vault import catalog
from corevault.vault.crashes import LocalVault

CLI = os.path.join(os.path.dirname(sys.executable), "corevault")


def _node_dir() -> str:
    """A directory for a node's state, removed when the test session ends (a node holds copies of cores)."""
    d = tempfile.mkdtemp(prefix="cv-node-")
    atexit.register(shutil.rmtree, d, ignore_errors=True)
    return d


@dataclass
class Node:
    dir: str
    config: str
    settings: config.Settings

    @property
    def spool(self) -> str:
        return self.settings.spool_dir

    def vault(self) -> LocalVault:
        return LocalVault(self.settings)

    def crashes(self) -> list[dict]:
        with self.vault().engine.connect() as conn:
            return catalog.list_crashes(conn, limit=1000)

    def agent(self, *args: str, **kw: object) -> subprocess.Popen:
        return subprocess.Popen(
            [CLI, "-c", self.config, "agent", *args], stderr=subprocess.PIPE, text=True, **kw
        )  # type: ignore[call-overload]

    def copy(self) -> Node:
        """Another node with this one's state as it is now (spool, store, a vault and catalog on disk)."""
        d = _node_dir()
        shutil.copytree(os.path.join(self.dir, "state"), os.path.join(d, "state"), symlinks=True)
        with open(self.config) as f:
            text = f.read().replace(f'state_dir = "{self.dir}/state"', f'state_dir = "{d}/state"', 1)
        cfg = os.path.join(d, "c.toml")
        with open(cfg, "w") as f:
            f.write(text)
        return Node(d, cfg, config.load(cfg))


_counter = iter(range(1_000_000))


def make_node(material: dict, vault: str = "", extra: str = "") -> Node:
    d = _node_dir()
    cfg = os.path.join(d, "c.toml")
    with open(cfg, "w") as f:
        f.write(f'state_dir = "{d}/state"\nnode_name = "node-{next(_counter)}"\n{vault}\n'
                f'[agent]\npoll_interval = 0.2\nmetrics = ""\n{extra}')  # fmt: skip
    settings = config.load(cfg)
    spool.ensure(settings.spool_dir)
    for entry in material["ids"]:
        shutil.copytree(
            os.path.join(material["dir"], "ready", entry),
            os.path.join(spool.ready_dir(settings.spool_dir), entry),
        )
    shutil.copytree(os.path.join(material["dir"], "store"), settings.buildid_dir, dirs_exist_ok=True)
    return Node(d, cfg, settings)
