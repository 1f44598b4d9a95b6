"""Running the node agent: everything ``corevault agent`` starts around the loop, in order.

The order matters and is the point of this module: the pod index is current before the
first entry is shipped (so a crash is attributed to its pod), SIGTERM and SIGINT are caught
before anything changes the host (so a stop request still restores it), the health
endpoint serves before the capture is installed, and the capture is installed last and
given back first, whatever ends the loop. The command line only parses options into
:func:`run`'s arguments.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

from corevault import config, hostsetup, printable
from corevault.errors import UserError

LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"


def capture_mode(install: str | None, forwarder: str | None) -> str | None:
    """The capture mode ``--install`` asks for on this kernel (None: the agent installs nothing)."""
    if install is None:
        return None
    if install not in hostsetup.MODES:
        raise UserError(f"--install {install!r}: use socket, pipe or auto")
    socket_ok = hostsetup.kernel_socket_mode() is not None
    mode = "socket" if install == "socket" or (install == "auto" and socket_ok) else "pipe"
    if mode == "socket" and not socket_ok:
        raise UserError(
            f"this kernel ({os.uname().release}) has no coredump socket (6.16+); use --install pipe"
        )
    if mode == "pipe" and not forwarder:
        raise UserError("pipe mode needs --forwarder BINARY (the static corevault-forward)")
    return mode


def run(
    settings: config.Settings,
    config_path: str | None,
    *,
    once: bool = False,
    kubernetes: bool = False,
    node: str | None = None,
    install: str | None = None,
    forwarder: str | None = None,
    handler: str | None = None,
) -> None:
    """Run the agent until stopped (with ``once``: until the spool is shipped).

    ``config_path`` is the settings file the kernel's handler (or the forwarder's) is given.
    Raises :class:`UserError` when ``once`` leaves entries in the spool.
    """
    from corevault.agent import coredumps, health
    from corevault.agent import receiver as forwarding
    from corevault.agent.loop import Agent

    mode = capture_mode(install, forwarder)
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    for h in logging.getLogger().handlers:  # a crashed process's names are data, never escapes
        h.setFormatter(printable.Formatter(LOG_FORMAT))
    if node:  # in a pod the hostname is the pod's name: the crashes it captures are the node's
        settings.node_name = node
    on_record = None
    if kubernetes:
        from corevault.kube import cluster
        from corevault.kube.events import EventPoster
        from corevault.kube.podwatch import PodWatch

        core = cluster.core_api()
        watch = PodWatch(core, settings.node_name, settings.podindex_dir)
        watch.relist()  # the index is current before the first entry is shipped
        threading.Thread(target=watch.run, daemon=True, name="pod-watch").start()
        on_record = EventPoster(core, settings.node_name)
    a = Agent(settings, on_record=on_record)
    if not once:  # snapshots asked for through the server, of this node's pods
        from corevault.agent.snapshots import SnapshotRequests

        requests = SnapshotRequests(settings, settings.node_name, a.stop)
        threading.Thread(target=requests.run, daemon=True, name="snapshots").start()
    for sig in (signal.SIGTERM, signal.SIGINT):  # from here on a stop request still restores the host
        signal.signal(sig, lambda *_: a.stop.set())
    if mode is not None:  # not ready until the kernel's (or the forwarder's) way in listens
        a.capture_socket = (
            hostsetup.socket_path(settings.state_dir)
            if mode == "socket"
            else hostsetup.forwarder_paths(settings.state_dir)[1]
        )
    a.metrics.serve(settings.agent_metrics, lambda: health.check(a))
    receiver = listener = None
    try:
        # last: the pod index is current when the first crash comes in
        if mode == "pipe":
            receiver = forwarding.install_forwarder(settings, config_path, forwarder)
        elif mode == "socket":
            listener = coredumps.install(settings, config_path)
        elif not once and hostsetup.kernel_socket_mode() is not None:
            listener = coredumps.attend(settings, config_path)  # for 'corevault install --mode socket'
        waiting = a.run(once=once)
    finally:
        if receiver is not None:
            forwarding.give_back(receiver)
        if listener is not None and mode == "socket":
            forwarding.give_back(listener)
        elif listener is not None:
            coredumps.step_aside(listener, config_path, handler or hostsetup.default_handler())
    if once and waiting:
        why = f"the vault is unreachable ({a.unreachable})" if a.unreachable else "shipping failed, see above"
        raise UserError(f"{waiting} entries left in the spool: {why}")
