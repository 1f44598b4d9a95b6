"""The values corevault passes between its stages: one crash's analysis report and its parts.

Frozen dataclasses with plain JSON forms (``to_dict``/``from_dict``), so a report written
by the analysis worker reads back identically in the vault, the CLI and the server.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

REPORT_VERSION = 1
#: the most a report's JSON may weigh. A crashed process decides how many threads, frames and
#: names its report holds, and every report passes whole through the agent's memory (read,
#: parsed, written to the store and the catalog), which every tenant's crashes share: the
#: analysis keeps its report within half of this (:mod:`corevault.analysis.worker`) and the
#: agent reads no more of an analysis's output than this
MAX_REPORT_BYTES = 16 << 20


def _plain(value: object) -> dict:
    """A flat dataclass of plain values as a dict."""
    return {f.name: getattr(value, f.name) for f in fields(value)}  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class Frame:
    index: int
    pc: int
    #: function name as the back-end reports it (demangled, with parameters for C++), or None
    function: str | None = None
    file: str | None = None
    line: int | None = None
    column: int | None = None
    inline: bool = False
    #: the mapped object the pc falls in, and the pc's offset from that object's load address
    module: str | None = None
    offset: int | None = None


@dataclass(frozen=True, slots=True)
class Run:
    """Frames of a deep stack that its report leaves out: ``count`` of them in a row, all of
    ``function``, or None where they are unnamed or of several functions."""

    function: str | None
    count: int


@dataclass(frozen=True, slots=True)
class Thread:
    tid: int
    crashed: bool
    frames: tuple[Frame, ...] = ()
    #: the unwinder stopped early (frame limit, or a stack it could not follow)
    incomplete: bool = False
    #: a stack too deep to show whole (a stack overflow): the frames left out between
    #: ``frames[:omitted_at]`` and the rest, in runs; the frames keep their own index
    omitted: tuple[Run, ...] = ()
    omitted_at: int = 0

    @property
    def depth(self) -> int:
        """Frames in the whole stack as unwound, the omitted ones included."""
        return len(self.frames) + sum(r.count for r in self.omitted)


@dataclass(frozen=True, slots=True)
class Module:
    path: str
    start: int
    end: int
    build_id: str | None = None
    #: the file used for it, matched by build-id, or None when none was found
    file: str | None = None
    #: whether DWARF debug info was found for it (file:line and inline frames)
    debuginfo: bool = False
    #: the key that found the file (a build-id, ``go-…`` or ``sha256-…``, see corevault.objectid)
    key: str | None = None
    #: SHA-256 of the file used: the content the crashed process really mapped
    sha256: str | None = None

    @property
    def found(self) -> bool:
        return self.file is not None


@dataclass(frozen=True, slots=True)
class Signal:
    number: int
    name: str | None
    code: int | None = None
    code_name: str | None = None
    #: faulting address for SIGSEGV, SIGBUS, SIGILL, SIGFPE and SIGTRAP
    fault_address: int | None = None
    #: what happened, in words ("abort", "address not mapped", ...)
    description: str | None = None


@dataclass(frozen=True, slots=True)
class Report:
    signal: Signal
    crashed_tid: int | None
    threads: tuple[Thread, ...]
    modules: tuple[Module, ...]
    backend: str
    core_size: int
    truncated: bool = False
    pid: int | None = None
    exe: str | None = None
    args: str | None = None
    registers: dict[str, int] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()
    signature: str | None = None
    #: the normalised frames the signature was computed from, for people to read
    signature_frames: tuple[str, ...] = ()
    title: str | None = None
    #: why it died in the program's own runtime's words (an assert's message, an uncaught
    #: exception, a panic), read from the core; untrusted text, never markup
    last_words: str | None = None
    #: set when this crash was matched to its group's analysed samples rather than analysed:
    #: ``{"fingerprint", "sample"}`` (the crash whose report this is)
    matched: dict | None = None
    version: int = REPORT_VERSION

    @property
    def crashed_thread(self) -> Thread | None:
        return next((t for t in self.threads if t.crashed), None)

    @property
    def missing_modules(self) -> tuple[Module, ...]:
        return tuple(m for m in self.modules if not m.found)

    def to_dict(self) -> dict:
        # By hand: dataclasses.asdict deep-copies every leaf, 0.3 s for a 1000-thread report.
        doc = {f.name: getattr(self, f.name) for f in fields(self)}
        doc["signal"] = _plain(self.signal)
        doc["threads"] = [
            {
                "tid": t.tid,
                "crashed": t.crashed,
                "incomplete": t.incomplete,
                "frames": [_plain(f) for f in t.frames],
                **(
                    {"omitted": [_plain(r) for r in t.omitted], "omitted_at": t.omitted_at}
                    if t.omitted
                    else {}
                ),
            }
            for t in self.threads
        ]
        doc["modules"] = [_plain(m) for m in self.modules]
        doc["registers"] = dict(self.registers)
        doc["warnings"] = list(self.warnings)
        doc["signature_frames"] = list(self.signature_frames)
        return doc

    @classmethod
    def from_dict(cls, doc: dict) -> Report:
        doc = dict(doc)
        doc["signal"] = Signal(**doc["signal"])
        doc["threads"] = tuple(
            Thread(
                **{
                    **t,
                    "frames": tuple(Frame(**f) for f in t["frames"]),
                    "omitted": tuple(Run(**r) for r in t.get("omitted", ())),
                }
            )
            for t in doc["threads"]
        )
        doc["modules"] = tuple(Module(**m) for m in doc["modules"])
        for key in ("warnings", "signature_frames"):
            doc[key] = tuple(doc.get(key, ()))
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in doc.items() if k in known})
