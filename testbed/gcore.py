"""Real cores without crashing anything: gdb's ``gcore`` of a live process.

For the tests and benchmarks that need a real core (an ELF core file of a real process,
its notes and its memory) but not the crash path that makes one: no ``core_pattern`` is
touched and nothing dies but the process started here, which is killed afterwards.
"""

from __future__ import annotations

import subprocess


def core_of(argv: list[str], dest: str, ready: bytes | None = None) -> None:
    """Start ``argv`` (its stdin a pipe it may wait on), wait for the line ``ready`` on its stdout
    (or 0.2 s), write its core to ``dest`` and kill it."""
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        if ready is not None:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if line != ready:
                raise RuntimeError(f"{argv[0]} said {line!r}, not {ready!r}")
        else:
            subprocess.run(["sleep", "0.2"], check=True)
        subprocess.run(
            ["gdb", "-nx", "-batch", "-p", str(proc.pid), "-ex", f"gcore {dest}"],
            capture_output=True, check=True, timeout=120,
        )  # fmt: skip
    finally:
        proc.kill()
        proc.wait()
