"""Admission: whether a crash gets a core, before a byte of it is read.

A crash is admitted when its pod (or a host rule) opted in (:mod:`.policy`), one of its
pod's and one of its namespace's dump slots is free (so one tenant never holds the
kernel's ``core_pipe_limit``), and the crash-storm limit allows it. Everything refused is
written to the spool's journal here, with the reason. The spool's shares (:func:`spool_budget`)
are decided here too: a socket-mode dump is refused before the kernel writes it when its
tenants' part of the spool is full.
"""

from __future__ import annotations

import os
import time

from corevault import config, spool
from corevault.capture import cgroup, lookup, policy, process, stream


def journal(settings: config.Settings, record: dict) -> None:
    try:
        spool.made(settings.spool_dir, lambda: spool.journal(settings.spool_dir, record))
    except OSError:
        pass  # nowhere left to say it; the crash must still be released


def new_record(settings: config.Settings, crash: process.Crash) -> dict:
    """The journal record of a crash, as far as the kernel's values tell."""
    return {
        "pid": crash.global_pid,
        "ns_pid": crash.pid,
        "signal": crash.signal,
        "crash_time": crash.time,
        "node": settings.node_name,
    }


def _core_uses_pid(settings: config.Settings) -> bool:
    if settings.core_uses_pid is not None:
        return settings.core_uses_pid
    try:  # not open(): its buffered file object costs each crash five system calls more
        fd = os.open("/proc/sys/kernel/core_uses_pid", os.O_RDONLY | os.O_CLOEXEC)
        try:
            return os.read(fd, 64).strip() not in (b"", b"0")
        finally:
            os.close(fd)
    except OSError:
        return False


class Admitted:
    """A crash that opted in, holds its tenants' dump slots and passed the storm limit."""

    __slots__ = ("cg", "crash", "owner", "plan", "record", "settings", "slots", "tenants")

    def __init__(self, settings: config.Settings, crash: process.Crash, *, cg: cgroup.CgroupInfo | None,
                 owner: lookup.Owner, plan: policy.Plan, record: dict, slots: list[int]) -> None:  # fmt: skip
        self.settings = settings
        self.crash = crash
        self.cg = cg
        self.owner = owner
        self.plan = plan
        self.record = record
        #: the pod's and the namespace's share keys (see :func:`policy.tenant_keys`)
        self.tenants = policy.tenant_keys(owner)
        #: the locked slot files; closing them gives the slots back
        self.slots = slots

    def replan(self) -> None:
        """Expand the pattern again, once values that were unknown at admission are known."""
        self.plan = policy.plan(self.crash, self.owner, self.settings, _core_uses_pid(self.settings))
        self.record.update(signal=self.crash.signal)

    def release(self) -> None:
        """Give the tenants' dump slots back (a pipe handler's exit does it too)."""
        for fd in self.slots:
            os.close(fd)
        self.slots = []


def admit(
    settings: config.Settings, crash: process.Crash, record: dict, warnings: list[str], *, limits: bool = True
) -> Admitted | None:
    """Decide whether this crash gets a core: its pod opted in, and the storm limit allows it.

    Everything refused is journaled here with the reason (also left in ``record["reason"]``);
    None means no core. ``limits=False`` (no dump slots, no storm limit) is for snapshots: a
    person asked for them, and they hold none of the kernel's dump slots.
    """
    record.update(exe=crash.exe, comm=crash.comm)
    cg = cgroup.parse(crash.cgroup)
    owner = lookup.find_owner(settings, cg, crash.exe, crash.comm, crash.uid)
    record["pod"] = owner.as_dict()
    plan = policy.plan(crash, owner, settings, _core_uses_pid(settings))
    warnings += plan.warnings
    if warnings:
        record["warnings"] = warnings
    if plan.refused:
        event = "skipped" if not plan.opted_in else "refused"
        record["reason"] = plan.refused
        journal(settings, {**record, "event": event})
        return None
    if not limits:
        return Admitted(settings, crash, cg=cg, owner=owner, plan=plan, record=record, slots=[])
    slots = _take_slots(settings, policy.tenant_keys(owner), record)
    if slots is None:
        return None
    kept, seen = policy.admit(
        settings.state_dir,
        policy.storm_key(owner, crash),
        settings.storm_max,
        settings.storm_window,
        time.time(),
    )
    if not kept:
        reason = (
            f"crash storm: {seen} crashes of this container in {settings.storm_window:g}s, "
            f"at most {settings.storm_max} cores kept"
        )
        record["reason"] = reason
        journal(settings, {**record, "event": "dropped"})
        for fd in slots:
            os.close(fd)
        return None
    return Admitted(settings, crash, cg=cg, owner=owner, plan=plan, record=record, slots=slots)


def _take_slots(
    settings: config.Settings, tenants: tuple[str | None, str | None], record: dict
) -> list[int] | None:
    """One of the pod's and one of the namespace's dump slots; None (journaled) when either is full.

    Refusing here, before a byte of the core is read, is what keeps one tenant from holding
    the kernel's core_pipe_limit: the handler exits at once and the kernel frees the slot.
    """
    pod, namespace = tenants
    held: list[int] = []
    for key, share, whose in (
        (pod, settings.pod_dumps, "pod"),
        (namespace, settings.namespace_dumps, "namespace"),
    ):
        if key is None:
            continue
        fd = policy.take_slot(settings.state_dir, key, share)
        if fd is None:
            for h in held:
                os.close(h)
            reason = (
                f"{share} dumps of this {whose} are being captured already "
                f"(its share, [capture] {whose}_dumps); refused before the core was read"
            )
            record["reason"] = reason
            journal(settings, {**record, "event": "dropped"})
            return None
        held.append(fd)
    return held


def spool_budget(
    settings: config.Settings,
    tenants: tuple[str | None, str | None],
    usage: tuple[int, dict[str, int]] | None = None,
) -> tuple[int, str]:
    """Bytes a new spool entry of ``tenants`` may take, and what limits it; SinkFailed when none.

    ``usage``: the spool's use as :func:`corevault.spool.usage_by_owner` gave it just now, if known.
    """
    pod, namespace = tenants
    shares = {k: part for k, part in ((pod, settings.pod_share), (namespace, settings.namespace_share)) if k}
    s = settings
    budget, binding = spool.made(
        s.spool_dir, lambda: spool.room(s.spool_dir, s.spool_max_size, s.spool_keep_free, shares, usage)
    )
    if binding is None:
        what = "spool is full (its max_size or keep_free is reached)"
    else:
        whose, part = (
            ("pod", settings.pod_share) if binding == pod else ("namespace", settings.namespace_share)
        )
        what = f"spool is full for this {whose}: its share ([spool] {whose}_share = {part:g}) is used up"
    if budget <= 0:
        raise stream.SinkFailed(what)
    return budget, what


def spool_full(settings: config.Settings, tenants: tuple[str | None, str | None]) -> str | None:
    """Why no spool entry can be made now, if it cannot (the vault target only)."""
    try:
        spool_budget(settings, tenants)
    except (OSError, stream.SinkFailed) as e:
        return describe_error(e)
    return None


def describe_error(e: BaseException) -> str:
    """A one-line reason from an error: its strerror and file, or its message."""
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}" + (f": {e.filename}" if e.filename else "")
    return str(e)
