"""The pipe handler's modules, compiled into one file the launcher loads them from.

Importing a module costs the import system about 0.1 ms however small the module is: it
looks the name up in each directory's listing, stats the source, opens, reads and checks
the ``.pyc`` and builds the module, in Python code of its own. The crash path has ~30 of
corevault's modules, so that is paid on every crash while the crashed process waits
(``python -m bench.capture --fixed-only``). The launcher (:func:`corevault.hostsetup.isolated_launcher`)
therefore reads the code of all of them from one file written next to it (:func:`write`),
with one finder (:func:`install`) ahead of the import system's own.

Nothing in it is a second copy to keep in step by hand: the file holds what ``compile`` made
of each source when the launcher was written, with the source's device, inode, size, mtime and
ctime, and a module is taken from it only while its source still has all of them (one
``stat``, as a ``.pyc`` is checked). Size and mtime alone, a ``.pyc``'s check, miss a source
replaced by one of the same size whose mtime was kept (``cp -p``, ``rsync -a``, ``tar x``, an
image layer's files): a new file has a new inode, a file written in place a new ctime, and
nobody can set a ctime. A changed source, a module the file does not hold, another Python's
bytecode or a damaged file are imported the ordinary way. Each module's ``__cached__`` (where its
``.pyc`` is) is written into the file too: the import system works it out from the source's path
for every module it sets up, in Python code of its own (0.42 M instructions of a small crash's
48 M, by callgrind). The file is written where the launcher is, by whoever installs corevault
(root), as pip writes ``__pycache__``.

The extension modules the crash path loads from the standard library (``_json``, ``fcntl``,
``_struct``, ``_sha256``) are held by their file's path and stamp, under the same check, and
loaded by the import system's own extension loader: found that way they cost no search of
``sys.path`` (the import system's finder for each directory, in Python code: ~25 µs each).
"""

# No ``from __future__ import annotations`` here: this module is imported the ordinary way,
# before its finder is in place, and ``__future__`` is a module that import would load from
# its .pyc too (~0.1 ms); the modules the file holds bring it in from the file instead.
import marshal
import os
from _frozen_importlib import ModuleSpec
from _frozen_importlib_external import (
    EXTENSION_SUFFIXES,
    MAGIC_NUMBER,
    ExtensionFileLoader,
    cache_from_source,
)

TYPE_CHECKING = False  # typing.TYPE_CHECKING would import typing, which the crash path never loads
if TYPE_CHECKING:
    from types import CodeType, ModuleType

#: what the file starts with: this format, then the interpreter's own bytecode magic
_FORMAT = b"cvbytecode5\n"


def write(path: str, modules: dict[str, str]) -> None:
    """Compile ``modules`` (name: source file; a package's is its ``__init__.py``; an extension
    module's, its shared object, held by its path) into ``path``."""
    from corevault import atomic

    held = {}
    for name, source in modules.items():
        if source.endswith(tuple(EXTENSION_SUFFIXES)):
            held[name] = (source, False, _stamp(os.stat(source)), None, "")
            continue
        with open(source, "rb") as f:
            st = os.fstat(f.fileno())  # what was compiled: a source replaced meanwhile is another
            # optimize=2, as ``python -OO`` compiles: without docstrings, a fifth of the file (the
            # crash path's modules hold their design in them), read and unmarshalled every crash;
            # their asserts, which only narrow types for the checker, go too
            code = compile(f.read(), source, "exec", dont_inherit=True, optimize=2)
        package = os.path.basename(source) == "__init__.py"
        held[name] = (source, package, _stamp(st), code, cache_from_source(source))
    atomic.write(path, _FORMAT + MAGIC_NUMBER + marshal.dumps(held), 0o644)


def is_current(path: str) -> bool:
    """Whether the file at ``path`` was written by this Python and every source it holds is unchanged."""
    held = _read(path)
    return held is not None and all(_unchanged(entry) for entry in held.values())


def _read(path: str) -> dict | None:
    head = _FORMAT + MAGIC_NUMBER
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)  # not open(): its buffering costs more than the read
        try:
            data = os.read(fd, os.fstat(fd).st_size + 1)
        finally:
            os.close(fd)
        if not data.startswith(head):
            return None
        # the trust of a .pyc: root wrote it beside the launcher, from corevault's own sources
        held = marshal.loads(memoryview(data)[len(head) :])  # noqa: S302
    except (OSError, ValueError, EOFError, TypeError):
        return None
    # a file of this format and Python that holds anything else is damaged: none of it is used
    return held if isinstance(held, dict) and all(map(_well_formed, held.values())) else None


def _well_formed(entry: object) -> bool:
    return (
        type(entry) is tuple
        and len(entry) == 5
        and type(entry[0]) is str
        and type(entry[2]) is tuple
        and (type(entry[3]) is _CODE or entry[3] is None)
        and type(entry[4]) is str
    )


_CODE = type(_well_formed.__code__)  # types.CodeType, without importing types
_MODULE = type(os)  # types.ModuleType


def _stamp(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _unchanged(entry: tuple) -> bool:
    try:
        return _stamp(os.stat(entry[0])) == entry[2]
    except OSError:
        return False


class _Loader:
    """Runs a module's code from the file (``exec_module``), as the import system runs a ``.pyc``."""

    __slots__ = ("code",)

    def __init__(self, code: "CodeType") -> None:
        self.code = code

    def create_module(self, spec: ModuleSpec) -> "ModuleType":
        """The module with the attributes the import system gives it (``_init_module_attrs``).

        It sets only what it does not find on the module, asking with ``getattr`` first: on a new
        module ``__file__``, ``__cached__`` and ``__path__`` are each an ``AttributeError`` whose
        message is formatted (the module's ``__spec__`` asked whether it is still initializing).
        Set here, only a plain module's ``__path__`` is left to fail.
        """
        module = _MODULE(spec.name)
        attrs = module.__dict__
        attrs["__spec__"], attrs["__loader__"], attrs["__package__"] = spec, self, spec.parent
        attrs["__file__"], attrs["__cached__"] = spec.origin, spec.cached
        if spec.submodule_search_locations is not None:
            attrs["__path__"] = spec.submodule_search_locations
        return module

    def exec_module(self, module: "ModuleType") -> None:
        exec(self.code, module.__dict__)  # noqa: S102 - what importing a .pyc does


class _Finder:
    """Finds the modules the file holds whose source is unchanged; nothing else."""

    __slots__ = ("held",)

    def __init__(self, held: dict) -> None:
        self.held = held

    def find_spec(self, name: str, path: object = None, target: object = None) -> ModuleSpec | None:
        entry = self.held.get(name)
        if entry is None or not _unchanged(entry):
            return None
        source, package, _, code, cached = entry
        if code is None:  # an extension module: what the import system's finder would give
            spec = ModuleSpec(name, ExtensionFileLoader(name, source), origin=source)
            spec.has_location = True
            return spec
        spec = ModuleSpec(name, _Loader(code), origin=source, is_package=package)
        spec.has_location = True  # __file__ is the source, as for an ordinary import
        spec.cached = cached  # __cached__ as an ordinary import has it, not worked out again
        if package:
            spec.submodule_search_locations = [os.path.dirname(source)]
        return spec

    def invalidate_caches(self) -> None:
        pass


def install(path: str) -> bool:
    """Put a finder for the modules held at ``path`` ahead of the import system's own path
    finder; False (and nothing changed) when the file is missing, damaged or another Python's."""
    import sys

    held = _read(path)
    if not held:
        return False
    sys.meta_path.insert(0, _Finder(held))
    return True
