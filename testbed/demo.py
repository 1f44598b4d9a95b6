"""``make demo``: install corevault on this machine, crash real programs in containers, show the cores.

Three "pods" run in real runc containers with Kubernetes cgroup paths and the annotation
from Alibaba Cloud ACS's guide (``alibabacloud.com/core-pattern: /data/dump-a/core-%E-%p-%t``),
a host directory standing in for their NAS volume. A fourth pod has no annotation. The
handler is installed with the built-in defaults (state under /var/lib/corevault) and
uninstalled at the end, which puts the host's own core settings back.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

from rich.console import Console
from rich.table import Table

from corevault import config, hostsetup, podindex, spool
from corevault.vault import catalog
from testbed import build, runc, sysctl

DEMO_DIR = "/tmp/corevault-demo"
SEED_PATTERN = "/data/dump-a/core-%E-%p-%t"
PODS = [
    ("checkout-7d9f4", ["/app/crasher", "segv"], "a NULL dereference in C"),
    (
        "pricing-5c6b8",
        ["/bin/sh", "-c", "/app/thrower /etc/pricing.yaml; exit 1"],
        "an uncaught C++ exception",
    ),
    ("ingest-0", ["/app/crasher", "thread"], "a crash in one of five threads"),
    ("batch-x2k1", ["/app/crasher", "segv"], "a crash in a pod that did not opt in"),
]
console = Console(highlight=False, width=max(shutil.get_terminal_size((120, 24)).columns, 120))


def corevault(*args: str) -> str:
    cli = os.path.join(os.path.dirname(sys.executable), "corevault")
    out = subprocess.run([cli, *args], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"corevault {' '.join(args)} failed: {out.stderr.strip()}")
    return out.stdout.strip()


def backtrace(exe: str, core: str, sysroot: str, frames: int = 4) -> list[str]:
    gdb = ["gdb", "-batch", "-nx", "-iex", "set auto-load off", "-iex", f"set sysroot {sysroot}"]
    out = subprocess.run(
        [*gdb, "-ex", "bt", exe, core], capture_output=True, text=True, check=False, timeout=60
    )
    lines = [line for line in out.stdout.splitlines() if line.startswith("#")]
    # gdb prints frame #0 once when it loads the core and again in the backtrace
    return [line for n, line in enumerate(lines) if n == 0 or line != lines[n - 1]][:frames]


def main() -> int:
    settings = config.load()
    shutil.rmtree(DEMO_DIR, ignore_errors=True)
    nas = os.path.join(DEMO_DIR, "nas")
    os.makedirs(nas)
    console.rule("[bold]corevault demo")
    console.print("Building the crash corpus (C and C++) and a busybox root filesystem for the containers…")
    programs = build.build_all()
    rootfs = runc.build_rootfs(os.path.join(DEMO_DIR, "rootfs"), programs)
    already = set(spool.entries(settings.spool_dir))

    with sysctl.core_settings() as saved:
        console.print(f"\nThe host's settings now: core_pattern=[cyan]{saved['core_pattern']}[/cyan]")
        handler = hostsetup.default_handler()
        try:
            hostsetup.pipe_pattern(
                handler, None if settings.state_dir == config.DEFAULT_STATE_DIR else "x" * 40
            )
            install = ["install"]
        except hostsetup.SetupError:  # a checkout deep in the filesystem: the kernel takes 127 bytes
            short = os.path.join(DEMO_DIR, "corevault-capture")
            os.symlink(handler, short)
            install = ["install", "--handler", short]
        console.print("$ corevault " + " ".join(install))
        console.print(corevault(*install))
        results = []
        for pod, args, what in PODS:
            annotations = {} if pod.startswith("batch") else {"alibabacloud.com/core-pattern": SEED_PATTERN}
            c = runc.Container(rootfs, args, volume=nas, annotations=annotations, hostname=pod)
            # What the node agent's pod watch would have written for this pod.
            app = pod.rsplit("-", 1)[0]
            podindex.write_pod(
                settings.podindex_dir,
                {
                    "uid": c.pod_uid, "namespace": "shop", "name": pod, "node": settings.node_name,
                    "annotations": annotations,
                    "containers": {app: {"id": c.id, "image": f"registry.example/shop/{app}:1.4.2"}},
                },
            )  # fmt: skip
            console.print(f"\n[bold]pod {pod}[/bold] ({what}) in container {c.id[:12]}…")
            console.print(f"  cgroup {c.cgroups_path}", style="dim")
            result = c.run()
            console.print(f"  exited with status {result.returncode}")
            results.append((pod, c))
        console.print("\n$ corevault uninstall")
        console.print(corevault("uninstall"))
        console.print(f"[green]restored[/green]: {hostsetup.read_sysctls() == saved}")

    console.rule("[bold]Where the cores landed")
    table = Table("pod", "signal", "core in the pod's volume (/data/dump-a)", "size", "on disk", "spool copy")
    entries = [
        spool.read_meta(settings.spool_dir, e) for e in spool.entries(settings.spool_dir) if e not in already
    ]
    by_container = {m["pod"]["container_id"]: m for m in entries}
    for pod, c in results:
        meta = by_container.get(c.id)
        if meta is None:
            table.add_row(pod, "", "[dim]nothing: no core-pattern annotation[/dim]", "", "", "")
            continue
        core = meta["core"]
        on_disk = os.stat(os.path.join(nas, os.path.basename(meta["volume"]["path"]))).st_blocks * 512
        table.add_row(
            pod,
            meta["signal"]["name"],
            os.path.basename(meta["volume"]["path"]),
            f"{core['size'] / 1024:.0f} KiB",
            f"{on_disk / 1024:.0f} KiB",
            f"{core['stored_size'] / 1024:.0f} KiB zstd",
        )
    console.print(table)

    console.rule("[bold]gdb on the cores, straight from the volume")
    for pod, c in results:
        meta = by_container.get(c.id)
        if meta is None:
            continue
        core = os.path.join(nas, os.path.basename(meta["volume"]["path"]))
        exe = os.path.join(rootfs, meta["process"]["exe"].lstrip("/"))
        console.print(f"[bold]{pod}[/bold]  $ gdb {meta['process']['exe']} {core}")
        for line in backtrace(exe, core, rootfs, frames=8 if meta["signal"]["name"] == "SIGABRT" else 4):
            console.print(f"    {line}")
        held = [m for m in meta["modules"] if m.get("sha256")]
        console.print(
            f"    binaries kept by key and content: {', '.join(os.path.basename(m['path']) for m in held)}",
            style="dim",
        )

    console.rule("[bold]The node agent ships the spool into the vault and explains each crash")
    console.print("$ corevault agent --once")
    out = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "corevault"), "agent", "--once"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    for line in out.stderr.splitlines():
        if " INFO shipped" in line:
            console.print("  " + line.split(" INFO ", 1)[1], style="dim")
    if out.returncode != 0:
        console.print(f"[red]the agent could not ship everything:[/red] {out.stderr.strip()[-500:]}")
    engine = catalog.connect(settings.catalog_url)
    ours = {by_container[c.id]["id"] for _, c in results if c.id in by_container}
    with engine.connect() as conn:
        rows = [r for r in catalog.list_crashes(conn, limit=500) if r["id"] in ours]
        groups = catalog.list_groups(conn)
    table = Table("namespace/pod", "container · image", "signal", "what happened", "signature")
    for r in rows:
        table.add_row(
            f"{r['namespace']}/{r['pod']}", f"{r['container']} · {r['image']}", r["signal_name"],
            r["title"] or r["analysis"], r["signature"] or "",
        )  # fmt: skip
    console.print(table)
    table = Table("crash groups in the catalog", "signature", "crashes", "last seen (UTC)")
    for g in groups[:8]:
        seen = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(g["last_seen"]))
        table.add_row(g["title"], g["signature"], str(g["count"]), seen)
    console.print(table)
    console.print("$ corevault analyze <crash id>   shows every thread, the registers and the modules\n")

    console.rule("[bold]On this node")
    console.print(f"spool (waiting for the vault): {spool.ready_dir(settings.spool_dir)}")
    console.print(f"binaries by key and content:   {settings.buildid_dir}/buildid/<key>/<sha256>")
    console.print(f"the vault (blobs):             {settings.vault_store}")
    console.print(f"the catalog:                   {settings.catalog_url}")
    console.print(f"the pods' volume:              {nas}")
    serve(settings)
    return 0


def serve(settings: config.Settings) -> None:
    """End with the server: the web UI, the API and debuginfod over the vault, on loopback."""
    import socket

    import uvicorn

    from corevault.server.access import Open
    from corevault.server.app import create_app

    port = int(os.environ.get("COREVAULT_DEMO_PORT", "8080"))
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            s.bind(("127.0.0.1", 0))
            console.print(f"(port {port} is taken; using {s.getsockname()[1]})", style="dim")
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    console.rule("[bold]The corevault server")
    console.print("Crash groups, each crash's stack, downloads and a debuginfod server, here without")
    console.print("login because it listens on 127.0.0.1 only (elsewhere: --tokens FILE or --kubernetes).")
    console.print(f"  $ corevault --server {url} list")
    console.print(f"  $ corevault --server {url} gdb ID            (gdb with the crash's own binaries)")
    console.print(f"  $ corevault --server {url} dump ID -o core")
    console.print(f"  $ DEBUGINFOD_URLS={url} gdb -iex 'set debuginfod enabled on' -c core")
    console.print(f"\nServing [bold]{url}/[/bold]  (Ctrl-C stops)", soft_wrap=True)
    sys.stdout.flush()
    uvicorn.run(create_app(settings, Open()), host="127.0.0.1", port=port, log_level="warning")


if __name__ == "__main__":
    sys.exit(main())
