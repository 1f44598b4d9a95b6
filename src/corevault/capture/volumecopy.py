"""The plain core written into the pod's volume on a thread of its own, given up when it stalls.

A pod's volume may be a FUSE filesystem whose server stops answering: the pod's own server, or
a bucket mount that hangs. A ``write(2)`` whose request the server has taken then waits until
it answers or the connection is aborted, and no signal ends the wait. Written from the thread
that reads the core, such a volume would hold what the whole node shares until the dump's
deadline: in pipe mode the kernel's pipe (one of ``core_pipe_limit``'s slots, and the crashed
process with it), in socket and forwarder modes one of the node's core readers.

So every step on the volume (the walk to its directory, the file's creation, the writes, the
publish and the clean-up) runs on a writer thread. The reading thread hands it the core's
chunks in bounded memory (:data:`POOL` data chunks in flight, copied: the reader's buffer is
its own again at once; a zero chunk travels as its length) and waits for a free buffer only
as the stall rule allows: when the writer finished nothing for ``stall`` seconds
(``stream.STALL``), the copy is given up with the step it
hung in, counted as a stuck writer (:mod:`.stuckwriters`), and the reading goes on into the
spool. The publish (``fsync``, ``close``, the rename: where s3fs and ``rclone`` upload, for
seconds per hundred MiB) is waited for before the process is let go, as the kernel's own file
cores are complete before the process is reaped, but under the same rule: a publish still under
way after ``stall`` seconds is waited for after the let-go, when it holds only the pod's own
slots, until ``until`` (before the dump's deadline, so the spool entry is finished in time); then
it is given up too.

A core read whole in its first read (shorter than a block: ``stream.pump``'s first read is
one) is handed over with the publish, in one wake-up, and the writer thread is started only
then: started with the dump, it took the GIL back and forth with the reading thread at every
system call of the reading thread's own (the spool entry, the compressor, the binaries), ~45
futex calls and a dozen context switches for a 4 KiB core. Its steps and the stall rule
are the same; only when they run differs. The writer ends after the publish, the last thing
asked of it, so closing the copy wakes no one.

Built on ``_thread`` and ``_collections`` (C, built into the interpreter): ``threading`` would
import more on every crash's path, and ``_queue`` is an extension module whose load (~0.4 ms)
every crash with a volume would pay, where :mod:`.offload` loads it for large cores only. A
thread given up is never waited for: it ends when its write returns, cleans up what it can (its
temporary file, its directory fd) and gives its stuck slots back.
"""

from __future__ import annotations

import _collections
import _thread
import os
import time

from corevault import config
from corevault.capture import buildid, mountinfo, safefs, stream, stuckwriters
from corevault.capture.admission import describe_error

#: data chunks in flight at most: each one is memory of the handler's (a 1 MiB chunk's buffer),
#: and one in flight lets reading and writing overlap
POOL = 2
_END = None
_SLOW = object()  # the publish is under way still


class Empty(Exception):
    """Nothing came within the timeout (:meth:`Channel.get`)."""


class Channel:
    """A queue with one reader: items in order, waited for with a timeout."""

    def __init__(self) -> None:
        self.items = _collections.deque()
        #: released when an item may be waiting (locked: the reader waits on it)
        self.signal = _thread.allocate_lock()
        self.signal.acquire()

    def put(self, *items: object) -> None:
        """Append ``items`` in order; the reader is woken once."""
        self.items.extend(items)
        if self.signal.locked():
            try:
                self.signal.release()
            except RuntimeError:  # another writer released it first
                pass

    def empty(self) -> bool:
        return not self.items

    def get(self, timeout: float = -1):  # -> the oldest item
        while not self.items:
            # a release left over from an item already taken only makes the loop look again
            if not self.signal.acquire(timeout=timeout):
                raise Empty
        return self.items.popleft()


class VolumeFailed(stream.SinkFailed):
    """The copy into the volume failed or was given up (the message says why, in one line)."""


class VolumeCopy:
    """A sink (:func:`corevault.capture.stream.pump`) that writes the plain core into ``directory``
    of the container's root ``root_fd`` on a thread of its own."""

    def __init__(
        self,
        settings: config.Settings,
        tenants: tuple[str | None, str | None],
        root_fd: int,
        directory: str,
        stall: float,
        *,
        proc_fd: int | None = None,
        whose: dict | None = None,
    ) -> None:
        self.settings = settings
        #: the crashed process's /proc/PID (its mountinfo names what a writer given up waits on)
        #: and whose dump it is, for the record the agent acts on (:func:`stuckwriters.note_mounts`)
        self.proc_fd = proc_fd
        self.whose = whose
        self.directory = directory
        #: the deepest fd the writer holds on the way to the volume's directory (the walk's, then
        #: the directory's own; -1 before and after): the place it waits on when it stops answering
        self.at_fd = -1
        self.tenants = tenants
        self.stall = stall
        self.name = "volume"
        #: why the pump left this sink out (set by the pump), or None
        self.failed: str | None = None
        #: why the copy was given up, or None
        self.given_up: str | None = None
        #: the step the writer is in, for the reason when it hangs there
        self.step = "opening its directory"
        #: steps the writer finished: what the stall rule watches
        self.done = 0
        self.error: BaseException | None = None
        self.inbox = Channel()
        self.free = Channel()
        self.results = Channel()
        self.ends = Channel()
        self.made = 0
        self.lock = _thread.allocate_lock()
        self.ended = False
        self.stuck: list[int] = []  # the stuck slots, once given up; closed when the thread ends
        self.publishing = False
        #: the thread's own root fd and directory until it is started (:meth:`_start`); the
        #: caller closes its root fd when the dump ends, given up or not
        self.pending: tuple[int, str] | None = (os.dup(root_fd), directory)
        #: what a core read whole in one read gave, handed over with the publish
        self.held: list[tuple] = []

    def _start(self) -> None:
        if self.pending is not None:
            args, self.pending = self.pending, None
            _thread.start_new_thread(self._run, args)

    # -- the reading thread's side

    def write(self, buf: bytearray, view: memoryview, n: int, zero: bool | None = None) -> None:
        """Hand ``view[:n]`` to the writer; raises when the copy failed or stalled."""
        self._raise()
        if zero or (zero is None and n == stream.CHUNK and buf == stream.zero_chunk()):
            item: tuple = (n, None)
        elif self.made < POOL and self.free.empty():
            self.made += 1
            # a small core's one read gets a buffer of its size: 1 MiB zeroed costs ~2 ms of CPU
            chunk = bytearray(n if n < stream.BLOCK else stream.CHUNK)
            chunk[:n] = view[:n]
            item = (n, chunk)
        else:
            chunk = self._wait(self.free)
            if len(chunk) < n:
                chunk = bytearray(stream.CHUNK)
            chunk[:n] = view[:n]
            item = (n, chunk)
        if self.pending is not None and not self.held and n < stream.BLOCK:
            self.held.append(item)  # the whole core: it goes with the publish
            return
        self._start()
        self.inbox.put(*self.held, item)
        self.held.clear()

    def publish(self, name: str, uid: int, gid: int) -> None:
        """Ask the writer to finish the file and publish it as ``name``; :meth:`result` says how."""
        self._raise()
        self.publishing = True
        self._start()
        self.inbox.put(*self.held, ("publish", name, uid, gid))
        self.held.clear()

    def result(self, until: float | None) -> str | None:
        """The published name; VolumeFailed when the copy failed, stalled, or outlasted ``until``
        (a monotonic time) while publishing. Without ``until``, None when the publish itself is
        still under way after ``stall`` seconds (ask again, with ``until``)."""
        if not self.publishing:
            self._raise()
            raise VolumeFailed("nothing was published")
        outcome = self._wait(self.results, until, slow=until is None)
        if outcome is _SLOW:
            return None
        self.publishing = False
        if isinstance(outcome, BaseException):
            raise VolumeFailed(describe_error(outcome)) from outcome
        return outcome

    def close(self) -> None:
        """End the writer: it removes what it did not publish. Waits as the stall rule allows."""
        if self.pending is not None:  # never started: nothing was made in the volume
            os.close(self.pending[0])
            self.pending, self.ended = None, True
            return
        self.inbox.put(_END)
        if self.given_up is None and not self.ended:
            try:
                self._wait(self.ends, check=False)
            except VolumeFailed:
                pass  # given up: it cleans up if it ever comes back

    def _raise(self) -> None:
        if self.given_up is not None:
            raise VolumeFailed(self.given_up)
        if self.error is not None:
            raise VolumeFailed(describe_error(self.error))

    def _wait(
        self, queue: Channel, until: float | None = None, *, check: bool = True, slow: bool = False
    ):  # -> an item, or _SLOW
        """The next item of ``queue``; gives the copy up when the writer finished no step for
        ``stall`` seconds (once it publishes: at ``until``; with ``slow``, :data:`_SLOW` is
        returned instead). ``check``: raise at once when the copy failed already."""
        seen = self.done
        while True:
            if check:
                self._raise()
            wait = self.stall if until is None else min(self.stall, max(until - time.monotonic(), 0.001))
            try:
                return queue.get(timeout=wait)
            except Empty:
                pass
            if self.done != seen:
                seen = self.done
            elif self.step == "publishing" and slow:
                return _SLOW
            elif not (self.step == "publishing" and until is not None and time.monotonic() < until):
                self._give_up()

    def _give_up(self) -> None:
        if self.step == "publishing":
            hung = "publishing it (fsync, close or rename) past the dump's deadline"
        else:
            hung = f"{self.step}, no progress for {self.stall:g}s"
        self.given_up = (
            f"the volume stopped answering while {hung}; the copy into it was given up and the core "
            "is kept in the spool: its filesystem (a FUSE or network mount) does not answer writes, "
            "repair that mount"
        )
        with self.lock:
            if not self.ended:
                self.stuck = stuckwriters.register(self.settings, self.tenants)
                noted = self._note_mounts()
                if noted is not None:
                    self.stuck.append(noted)
        raise VolumeFailed(self.given_up)

    def _note_mounts(self) -> int | None:
        """Record the FUSE mounts the writer waits on (:func:`stuckwriters.note_mounts`), with
        ``self.lock`` held (the writer's fds stay open meanwhile).

        The mount of the fd the writer holds deepest on its way (:attr:`at_fd`: the walk's, on
        the mount it waits to look into or to open, then the directory's), found by its
        ``mnt_id`` in the crashed process's mountinfo, when it is a FUSE one (before the walk
        holds any: every FUSE mount at the directory or above it). No mount is asked anything.
        Where that mountinfo cannot tell (the process is gone: the writer was given up after the
        let-go; or it lists no such mount: the pod unmounted it lazily while the writer walked),
        the held fd's own device names the connection (:func:`stuckwriters.held_device`), with no
        mount point."""
        if self.proc_fd is None or self.whose is None or not (self.whose.get("pod") or {}).get("uid"):
            return None  # a dump in no pod: no mount of it is ever aborted
        held = self.at_fd
        try:
            mount_id = buildid.mount_id(held) if held >= 0 else None
            info = mountinfo.lines("mountinfo", self.proc_fd)
            mounts: dict[bytes, bytes | None] | None = mountinfo.fuse_on_the_way(
                info, self.directory, mount_id
            )
        except OSError:
            mounts = None  # the process is gone: its namespace's mounts cannot be told
        if mounts is None and held >= 0:
            device = stuckwriters.held_device(held)
            mounts = {device: None} if device is not None else None
        return stuckwriters.note_mounts(self.settings, mounts or {}, self.whose)

    # -- the writer thread

    def _at(self, fd: int) -> None:
        """Where the walk is (:func:`safefs.open_dir`); it closes the fd it held only after this."""
        with self.lock:
            self.at_fd = fd

    def _run(self, root_fd: int, directory: str) -> None:
        dir_fd = -1
        new: safefs.NewFile | None = None
        sink: stream.SparseSink | None = None
        published: object = _END  # what the publish gave, handed over once the thread is done
        try:
            try:
                dir_fd = safefs.open_dir(root_fd, directory, self._at)
                self.step = "creating the file"
                new = safefs.NewFile(dir_fd)
                sink = stream.SparseSink(new.fd)
                self.step = "writing the core"
            except (safefs.UnsafePath, OSError) as e:
                self.error = e
            finally:
                os.close(root_fd)
            self.done += 1
            while (item := self.inbox.get()) is not _END:
                if item[0] == "publish":  # the last thing asked: nothing is written after it
                    published = self._publish(new, sink, *item[1:])
                    new = None
                    break
                n, chunk = item
                if self.error is None and self.given_up is None:
                    try:
                        if chunk is None:
                            sink.write(stream.zero_chunk(), memoryview(stream.zero_chunk()), n, True)
                        else:
                            sink.write(chunk, memoryview(chunk), n, False)
                    except OSError as e:
                        self.error = e
                self.done += 1
                if chunk is not None:
                    self.free.put(chunk)
        finally:
            self.step = "removing what it did not publish"
            if new is not None:
                new.discard()
            with self.lock:
                if dir_fd >= 0:
                    self.at_fd = -1
                    os.close(dir_fd)
                self.ended = True
                stuck, self.stuck = self.stuck, []
            for fd in stuck:
                os.close(fd)
            if published is not _END:
                self.results.put(published)
            self.ends.put(True)

    def _publish(
        self, new: safefs.NewFile | None, sink: stream.SparseSink | None, name: str, uid: int, gid: int
    ):
        """Finish and publish the file: its published name, or what failed."""
        if self.given_up is not None:  # its writes were skipped since: never published
            return VolumeFailed(self.given_up)
        if self.error is not None or new is None or sink is None:
            return self.error or VolumeFailed("the file was not created")
        self.step = "publishing"
        try:
            sink.finish()
            return new.publish(name, uid, gid)
        except (OSError, safefs.UnsafePath) as e:
            return e
        finally:
            self.done += 1
