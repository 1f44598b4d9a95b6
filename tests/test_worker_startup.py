"""What the sandboxed analysis worker imports: only what a crash's analysis uses.

Every analysis starts a fresh worker, so each module it imports is paid for per crash
(docs/analysis.md). A plain C crash (no runtime's death path, no Go stack switch, names from
DWARF) needs neither pyelftools nor a helper process; these tests keep it that way.
"""

from __future__ import annotations

import json
import os
import subprocess

from corevault import spool
from corevault.analysis import runner, sandbox
from tests.conftest import FIXTURE_SPOOL

REPORT_AND_MODULES = """
import contextlib, io, json
from corevault.analysis import worker
out = io.StringIO()
with contextlib.redirect_stdout(out):
    worker.main(sys.argv[1:])
print(json.dumps({"report": json.loads(out.getvalue()), "modules": sorted(sys.modules)}))
"""


def test_a_plain_crash_is_analysed_without_an_elf_library_or_a_helper_process(tmp_path) -> None:
    [entry] = [
        e
        for e in os.listdir(spool.ready_dir(FIXTURE_SPOOL))
        if spool.read_meta(FIXTURE_SPOOL, e)["process"]["exe"] == "/app/crasher"
    ]
    core = str(tmp_path / "core")
    runner.decompress(os.path.join(spool.ready_dir(FIXTURE_SPOOL), entry, spool.CORE_NAME), core)
    record = tmp_path / "record.json"
    record.write_text(json.dumps(spool.read_meta(FIXTURE_SPOOL, entry)["modules"]))
    store = os.path.join(FIXTURE_SPOOL, "store")
    # the interpreter as the sandbox starts it, here without the sandbox: no root needed
    cmd = sandbox.python(REPORT_AND_MODULES, [core, "--store", store, "--record", str(record)])
    out = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=120).stdout)
    assert out["report"]["title"] == "SIGFPE in divide ← main"
    loaded = set(out["modules"])
    assert "drgn" in loaded and "site" not in loaded
    assert not {m for m in loaded if m == "elftools" or m.startswith("elftools.")}
    assert not loaded & {"subprocess", "tempfile", "corevault.analysis.unwind_gdb"}
