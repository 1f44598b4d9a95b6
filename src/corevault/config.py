"""Node settings: where corevault keeps its state and how the capture handler behaves.

Settings come from a TOML file (default ``/etc/corevault/config.toml``) with sane defaults
under ``/var/lib/corevault``; every consumer gets them passed down explicitly. The capture
handler runs once per crash and imports this module, so it stays cheap: plain classes with
``__slots__`` instead of dataclasses, and ``tomllib`` only when a file is actually read.

Example::

    state_dir = "/var/lib/corevault"

    [capture]
    targets = ["volume", "vault"]   # turn either off for the whole node
    timeout = 300                   # seconds a crashing process may be held at most
    storm_max = 5                   # cores kept per container per window; the rest are counted
    storm_window = 600
    pod_dumps = 2                   # dumps of one pod read at once; more are refused at once
    namespace_dumps = 4             # the same for one namespace
    max_objects = 500               # mapped files of one crash looked at for binaries to keep
    max_objects_size = "4G"         # and bytes of those binaries hashed; the rest are journaled
    abort_stuck_fuse = true         # the agent aborts a pod's own FUSE connection a dump is stuck on

    [spool]
    max_size = "10G"                # the spool never grows past this
    keep_free = "1G"                # and never leaves less free on its filesystem
    pod_share = 0.25                # one pod's entries take at most this part of it
    namespace_share = 0.5           # one namespace's at most this part
    store_max_size = "2G"           # the binaries kept for analysis (also within max_size)
    compression_level = 1           # zstd level: 1 is within 2 % of 3 on cores, at 2/3 of its CPU
    compression_threads = 1

    [analysis]
    debuginfod_urls = "https://debuginfod.debian.net"  # like DEBUGINFOD_URLS: debug files by build-id
    debug_dirs = ["/usr/lib/debug"]  # separate debug files under .build-id/ on this host
    debuginfod_cache_max = "4G"     # the debug files fetched and kept on the node, oldest removed past it

    [[rules]]                       # hosts without Kubernetes: who opts in
    exe = "/usr/local/bin/my-server*"
    pattern = "/var/crash/core-%e-%p-%t"
"""

from __future__ import annotations

import os

from corevault import podannotations

DEFAULT_CONFIG = "/etc/corevault/config.toml"
DEFAULT_STATE_DIR = "/var/lib/corevault"
TARGETS = frozenset({"volume", "vault"})

_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


class ConfigError(ValueError):
    """A settings file or value that cannot be used; the message says which and why."""


def parse_size(value: object, what: str = "size") -> int:
    """Parse ``123``, ``"64K"``, ``"512M"``, ``"10G"`` or ``"1Ti"`` into bytes."""
    if isinstance(value, bool):
        raise ConfigError(f"{what}: expected a size such as 512M, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"{what}: a size cannot be negative, got {value}")
        return value
    if not isinstance(value, str):
        raise ConfigError(f"{what}: expected a size such as 512M, got {value!r}")
    text = value.strip().upper().removesuffix("B").removesuffix("I")
    unit = text[-1:] if text[-1:] in _SUFFIXES else ""
    number = text[: len(text) - len(unit)].strip()
    if not number.isdigit():
        raise ConfigError(f"{what}: {value!r} is not a size; use bytes or a K/M/G/T suffix, e.g. 512M")
    return int(number) * _SUFFIXES[unit]


class Rule:
    """One host rule: processes it matches opt in as if their pod carried ``annotations``."""

    __slots__ = ("annotations", "comm", "exe", "uid")

    def __init__(self, exe: str | None, comm: str | None, uid: int | None, annotations: dict[str, str]):
        self.exe = exe
        self.comm = comm
        self.uid = uid
        self.annotations = annotations

    def matches(self, exe: str, comm: str, uid: int) -> bool:
        if self.exe is not None and not glob_match(exe, self.exe):
            return False
        if self.comm is not None and not glob_match(comm, self.comm):
            return False
        return self.uid is None or self.uid == uid


def glob_match(name: str, pattern: str) -> bool:
    """``fnmatch.fnmatchcase(name, pattern)``.

    The capture handler matches host rules on every crash, and fnmatch compiles a regular
    expression: importing ``re`` costs ~7 ms. Patterns made of literals, ``*`` and ``?`` (every
    rule of the examples) are matched here instead; ``[…]`` sets go to fnmatch.
    """
    if "[" in pattern:
        from fnmatch import fnmatchcase

        return fnmatchcase(name, pattern)
    # Two pointers; on a mismatch, the last ``*`` takes one more character and matching resumes.
    n = p = 0
    star, resume = -1, 0
    while n < len(name):
        if p < len(pattern) and pattern[p] == "*":
            star, resume = p, n
            p += 1
        elif p < len(pattern) and pattern[p] in ("?", name[n]):
            n += 1
            p += 1
        elif star >= 0:
            resume += 1
            n, p = resume, star + 1
        else:
            return False
    return pattern[p:].strip("*") == ""


class Settings:
    """Everything a node's corevault needs to know; built by :func:`load`."""

    __slots__ = (
        "abort_stuck_fuse",
        "agent_analyze",
        "agent_metrics",
        "agent_poll",
        "agent_ship_batch",
        "agent_ship_parallel",
        "alerts",
        "analysis_memory",
        "analysis_processes",
        "analysis_timeout",
        "analysis_uid",
        "analysis_uids",
        "analysis_workers",
        "azure",
        "buildid_dir",
        "catalog_url",
        "compression_level",
        "compression_threads",
        "core_uses_pid",
        "debug_dirs",
        "debuginfo_dir",
        "debuginfod_cache_max",
        "debuginfod_max_size",
        "debuginfod_timeout",
        "debuginfod_urls",
        "gcs",
        "group_samples",
        "match_after",
        "namespace_dumps",
        "namespace_share",
        "node_name",
        "objects_max",
        "objects_max_size",
        "pod_dumps",
        "pod_share",
        "podindex_dir",
        "retention_max_age_days",
        "retention_max_size",
        "retention_namespace_max_size",
        "rules",
        "runtime_dirs",
        "s3",
        "source",
        "spool_dir",
        "spool_keep_free",
        "spool_max_size",
        "state_dir",
        "store_max_size",
        "storm_max",
        "storm_window",
        "targets",
        "timeout",
        "vault_abandoned_days",
        "vault_store",
    )

    def __init__(self, state_dir: str = DEFAULT_STATE_DIR) -> None:
        #: the file these settings were read from, or None for the built-in defaults
        self.source: str | None = None
        self.state_dir = state_dir
        #: finished and in-progress spool entries, the journal of dropped dumps
        self.spool_dir = os.path.join(state_dir, "spool")
        #: the mapped binaries, by key and content (``buildid/<key>/<sha256>``, see nodestore)
        self.buildid_dir = os.path.join(state_dir, "store")
        #: the node-local pod index the agent keeps (see :mod:`corevault.podindex`)
        self.podindex_dir = os.path.join(state_dir, "pods")
        #: where container runtimes keep their state (OCI bundles, runc state.json)
        self.runtime_dirs: tuple[str, ...] = (
            "/run/containerd/io.containerd.runtime.v2.task/k8s.io",
            "/run/containerd/runc/k8s.io",
            "/run/runc",
            "/var/lib/containers/storage/overlay-containers",
        )
        #: which copies a crash gets: the pod's own volume and/or the node spool for the vault
        self.targets: frozenset[str] = TARGETS
        #: seconds after which the handler gives up on a dump so the process can finish dying
        self.timeout = 300.0
        #: at most this many cores per container within ``storm_window`` seconds
        self.storm_max = 5
        self.storm_window = 600.0
        #: dumps of one pod (one namespace) read at once; the kernel's core_pipe_limit is shared
        self.pod_dumps = 2
        self.namespace_dumps = 4
        #: mapped files of one crash the handler looks at (for ELF objects to hash and keep), and
        #: the bytes of ELF objects it hashes: a process mapping 100,000 files costs no more
        self.objects_max = 500
        self.objects_max_size = 4 << 30
        self.spool_max_size = 10 << 30
        self.spool_keep_free = 1 << 30
        #: the part of the spool one pod's (one namespace's) entries may take
        self.pod_share = 0.25
        self.namespace_share = 0.5
        #: disk the node's binary store may take; it also counts within spool_max_size
        self.store_max_size = 2 << 30
        #: zstd level of the spool's copy (docs/capture.md: "The compressed copy and its hash")
        self.compression_level = 1
        self.compression_threads = 1
        #: name recorded as the crash's node (the host's own name by default)
        self.node_name = os.uname().nodename
        #: follow the kernel's core_uses_pid when expanding pod patterns (None: read the sysctl)
        self.core_uses_pid: bool | None = None
        #: the agent aborts the FUSE connection of a pod's own mount that a pipe dump of the pod's
        #: is stuck on past ``timeout`` (:mod:`corevault.agent.stuckdumps`)
        self.abort_stuck_fuse = True
        self.rules: list[Rule] = []
        #: the server's alert settings ([alerts]), read by corevault.alerts.sinks
        self.alerts: dict = {}
        #: where the vault keeps blobs: file:///path (local disk, NAS), s3://bucket/prefix,
        #: gs://bucket/prefix, az://container/prefix or azure://account/container/prefix
        self.vault_store = "file://" + os.path.join(state_dir, "vault")
        #: days after which an unfinished upload nobody took up again is aborted (S3's parts, temporary files)
        self.vault_abandoned_days = 7.0
        #: the catalog: SQLite by default, PostgreSQL (postgresql+psycopg://…) when nodes share one
        self.catalog_url = "sqlite:///" + os.path.join(state_dir, "catalog.db")
        self.s3 = S3Settings()
        self.azure = CloudSettings()
        self.gcs = CloudSettings()
        #: seconds between the agent's looks at the spool
        self.agent_poll = 2.0
        #: host:port for the agent's Prometheus metrics, or "" for none
        self.agent_metrics = "127.0.0.1:9464"
        #: whether the agent analyses each crash (after it is in the catalog, apart from shipping)
        self.agent_analyze = True
        #: at most this many spool entries shipped together: their rows in one transaction
        self.agent_ship_batch = 64
        #: at most this many small entries' blobs uploaded at once
        self.agent_ship_parallel = 4
        #: seconds and bytes of memory (RLIMIT_DATA) one analysis may take before it is stopped
        self.analysis_timeout = 300.0
        #: upstream debuginfod servers asked for the debug files of system libraries (none by default)
        self.debuginfod_urls: tuple[str, ...] = ()
        #: seconds and bytes one upstream fetch may take at most
        self.debuginfod_timeout = 30.0
        #: full analyses of one fingerprint, in one namespace, that the agent collects; past
        #: ``match_after`` of them, a crash with that fingerprint is analysed in full only when
        #: no other analysis waits (0: always analyse in full); see corevault.fingerprint
        self.group_samples = 20
        #: agreeing full analyses of one fingerprint after which its next crashes may be matched
        #: to them rather than analysed (at most ``group_samples``)
        self.match_after = 3
        self.debuginfod_max_size = 1 << 30
        #: bytes the fetched debug files may hold on the node: past it, the oldest fetched are
        #: removed (a pod chooses which build-ids its objects claim, so what is fetched)
        self.debuginfod_cache_max = 4 << 30
        #: debug files fetched from upstream, by build-id and the content hash of the object they
        #: were fetched for (``buildid/<id>/<sha256>.debuginfo``)
        self.debuginfo_dir = os.path.join(state_dir, "debuginfo")
        #: trees of separate debug files keyed by build-id (``<dir>/.build-id/xx/rest.debug``)
        self.debug_dirs: tuple[str, ...] = ("/usr/lib/debug",)
        self.analysis_memory = 4 << 30
        #: analyses at once; 0: as many as there are cores, and as fit in memory at the cap each
        self.analysis_workers = 0
        #: the uid and gid the sandboxed analysis worker runs as (used by nothing else)
        self.analysis_uid = 64_900
        #: uids from ``analysis_uid`` on, one per analysis running at once (none shares its processes)
        self.analysis_uids = 32
        #: processes (and threads) one analysis may run, its template's included: ``RLIMIT_NPROC``
        self.analysis_processes = 256
        self.retention_max_age_days: float | None = None
        self.retention_max_size: int | None = None
        self.retention_namespace_max_size: int | None = None


class S3Settings:
    """How to reach an S3-compatible store (AWS S3, Alibaba OSS, MinIO, SeaweedFS)."""

    __slots__ = (
        "addressing",
        "checksums",
        "concurrency",
        "credentials_file",
        "endpoint",
        "part_size",
        "proxy",
        "public_endpoint",
        "redirect_downloads",
        "region",
    )

    def __init__(self) -> None:
        #: the server answers a download of a stored binary with a redirect to a presigned URL of
        #: the object (valid one minute), so the bytes go from the store to the reader; false
        #: when readers cannot reach ``endpoint`` (the server then streams them itself)
        self.redirect_downloads = True
        #: e.g. https://s3.oss-cn-hangzhou.aliyuncs.com for Alibaba OSS; None for AWS
        self.endpoint: str | None = None
        #: the store's address as readers reach it, where it is not ``endpoint`` (the server's,
        #: inside the cluster): the redirects' presigned URLs name it; None: ``endpoint``
        self.public_endpoint: str | None = None
        self.region: str | None = None
        #: "auto", "path" or "virtual" (OSS needs virtual-hosted addressing)
        self.addressing = "auto"
        #: parts of a multipart upload (larger objects get larger parts: S3 allows 10,000)
        self.part_size = 8 << 20
        self.concurrency = 2
        #: "when_supported" (CRC per part, checked by the server) or "when_required" (OSS)
        self.checksums = "when_supported"
        #: an AWS-style credentials file; otherwise the usual AWS_* variables and profiles
        self.credentials_file: str | None = None
        #: the HTTP proxy of the store's requests (http://[user:password@]host:port), or "none"
        #: for none; None: HTTPS_PROXY / HTTP_PROXY / NO_PROXY decide (corevault.vault.s3proxy)
        self.proxy: str | None = None


class CloudSettings:
    """How to reach Google Cloud Storage (``[vault.gcs]``) or Azure Blob Storage (``[vault.azure]``).

    Credentials are not settings: each cloud's own chain finds them (docs/vault.md).
    """

    __slots__ = ("concurrency", "endpoint", "part_size", "project")

    def __init__(self) -> None:
        #: Azure: the account's URL (https://ACCOUNT.blob.core.windows.net); GCS: another API
        #: endpoint than Google's (an emulator); None for the default
        self.endpoint: str | None = None
        #: GCS: the project, where the credentials do not say it
        self.project: str | None = None
        #: blocks (Azure) or resumable-upload chunks (GCS, a multiple of 256 KiB)
        self.part_size = 8 << 20
        self.concurrency = 2


def load(path: str | None = None) -> Settings:
    """Read settings from ``path`` (default: ``$COREVAULT_CONFIG`` or /etc/corevault/config.toml).

    A missing default file means built-in defaults; a missing explicit file is an error.
    A ``.json`` path is a capture snapshot written by :func:`write_snapshot`.
    """
    if path is not None and path.endswith(".json"):
        return _load_snapshot(path)
    doc, source = read_document(path)
    settings = from_dict(doc, where=source or "built-in defaults")
    settings.source = source
    return settings


def read_document(path: str | None = None) -> tuple[dict, str | None]:
    """The parsed TOML settings document and its path; ``({}, None)`` for built-in defaults."""
    explicit = path is not None or "COREVAULT_CONFIG" in os.environ
    path = path or os.environ.get("COREVAULT_CONFIG") or DEFAULT_CONFIG
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"config file {path} does not exist; create it or drop --config") from None
        return {}, None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    import tomllib

    try:
        return tomllib.loads(raw.decode()), path
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None


# The capture handler runs once per crash and must start fast; parsing TOML costs it more
# than everything else it imports together (tomllib pulls in re, typing and datetime). So
# ``corevault install`` writes the validated settings as JSON into the state directory and
# the handler reads that snapshot. ``snapshot_state`` tells when the TOML changed since.
SNAPSHOT_NAME = "capture.json"
DEFAULT_SNAPSHOT = os.path.join(DEFAULT_STATE_DIR, SNAPSHOT_NAME)


def write_snapshot(path: str | None = None) -> tuple[Settings, str]:
    """Validate the settings at ``path`` and write their capture snapshot; returns both."""
    doc, source = read_document(path)
    settings = from_dict(doc, where=source or "built-in defaults")
    settings.source = source
    snap = {"version": 1, "source": source, "source_mtime_ns": _mtime_ns(source), "settings": doc}
    dest = os.path.join(settings.state_dir, SNAPSHOT_NAME)
    os.makedirs(settings.state_dir, mode=0o700, exist_ok=True)
    import json

    from corevault import atomic

    atomic.write(dest, json.dumps(snap, indent=1, default=str))
    return settings, dest


def snapshot_is_stale(snapshot_path: str) -> bool:
    """Whether the TOML file behind a snapshot changed after the snapshot was written."""
    try:
        snap = _read_snapshot(snapshot_path)
    except ConfigError:
        return True
    return snap.get("source_mtime_ns") != _mtime_ns(snap.get("source"))


def _mtime_ns(path: str | None) -> int | None:
    try:
        return os.stat(path).st_mtime_ns if path else None
    except OSError:
        return None


def _read_snapshot(path: str) -> dict:
    from corevault import quickjson

    try:
        # not open(): its buffered file object costs each crash's handler five system calls more
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            raw = os.read(fd, os.fstat(fd).st_size + 1)  # written whole, by atomic.write
        finally:
            os.close(fd)
        snap = quickjson.loads(raw)
    except FileNotFoundError:
        raise ConfigError(f"settings snapshot {path} does not exist; run 'corevault install' again") from None
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"settings snapshot {path} is unreadable ({e}); run 'corevault install' again"
        ) from None
    if not isinstance(snap, dict) or not isinstance(snap.get("settings"), dict):
        raise ConfigError(
            f"settings snapshot {path} is not one corevault wrote; run 'corevault install' again"
        )
    return snap


def _load_snapshot(path: str) -> Settings:
    snap = _read_snapshot(path)
    settings = from_dict(snap["settings"], where=snap.get("source") or "built-in defaults")
    settings.source = snap.get("source")
    return settings


def from_dict(doc: dict, where: str = "config") -> Settings:
    """Build settings from a parsed document, rejecting unknown keys and wrong types."""
    _known(
        doc,
        {"state_dir", "node_name", "capture", "spool", "paths", "rules", "vault", "agent", "retention"}
        | {"analysis", "alerts"},
        where,
    )
    s = Settings(_str(doc, "state_dir", where, DEFAULT_STATE_DIR))
    s.node_name = _str(doc, "node_name", where, s.node_name)

    paths = _table(doc, "paths", where)
    _known(paths, {"spool", "buildid_store", "pod_index", "runtime_dirs"}, f"{where} [paths]")
    s.spool_dir = _str(paths, "spool", where, s.spool_dir)
    s.buildid_dir = _str(paths, "buildid_store", where, s.buildid_dir)
    s.podindex_dir = _str(paths, "pod_index", where, s.podindex_dir)
    if "runtime_dirs" in paths:
        s.runtime_dirs = tuple(_strlist(paths, "runtime_dirs", where))

    cap = _table(doc, "capture", where)
    _known(
        cap,
        {"targets", "timeout", "storm_max", "storm_window", "core_uses_pid", "pod_dumps", "namespace_dumps"}
        | {"max_objects", "max_objects_size", "abort_stuck_fuse"},
        f"{where} [capture]",
    )
    if "targets" in cap:
        s.targets = parse_targets(_strlist(cap, "targets", where), f"{where} [capture] targets")
    s.timeout = _number(cap, "timeout", where, s.timeout)
    s.storm_max = int(_number(cap, "storm_max", where, s.storm_max))
    s.storm_window = _number(cap, "storm_window", where, s.storm_window)
    for key in ("pod_dumps", "namespace_dumps"):
        value = _number(cap, key, where, getattr(s, key))
        if value != int(value) or not 1 <= value <= 1024:
            raise ConfigError(f"{where} [capture] {key}: use a whole number from 1 to 1024, got {value}")
        setattr(s, key, int(value))
    objects_max = _number(cap, "max_objects", where, s.objects_max)
    if objects_max != int(objects_max) or objects_max < 1:
        raise ConfigError(f"{where} [capture] max_objects: use a whole number from 1 up, got {objects_max}")
    s.objects_max = int(objects_max)
    if "max_objects_size" in cap:
        s.objects_max_size = parse_size(cap["max_objects_size"], f"{where} [capture] max_objects_size")
    if "core_uses_pid" in cap:
        if not isinstance(cap["core_uses_pid"], bool):
            raise ConfigError(f"{where} [capture] core_uses_pid: expected true or false")
        s.core_uses_pid = cap["core_uses_pid"]
    if "abort_stuck_fuse" in cap:
        if not isinstance(cap["abort_stuck_fuse"], bool):
            raise ConfigError(f"{where} [capture] abort_stuck_fuse: expected true or false")
        s.abort_stuck_fuse = cap["abort_stuck_fuse"]

    spool = _table(doc, "spool", where)
    _known(
        spool,
        {
            "max_size",
            "keep_free",
            "store_max_size",
            "compression_level",
            "compression_threads",
            "pod_share",
            "namespace_share",
        },
        f"{where} [spool]",
    )
    if "max_size" in spool:
        s.spool_max_size = parse_size(spool["max_size"], f"{where} [spool] max_size")
    if "keep_free" in spool:
        s.spool_keep_free = parse_size(spool["keep_free"], f"{where} [spool] keep_free")
    if "store_max_size" in spool:
        s.store_max_size = parse_size(spool["store_max_size"], f"{where} [spool] store_max_size")
    s.compression_level = int(_number(spool, "compression_level", where, s.compression_level))
    if not 1 <= s.compression_level <= 19:
        raise ConfigError(f"{where} [spool] compression_level: use 1 to 19, got {s.compression_level}")
    s.compression_threads = int(_number(spool, "compression_threads", where, s.compression_threads))
    for key in ("pod_share", "namespace_share"):
        value = _number(spool, key, where, getattr(s, key))
        if not 0 < value <= 1:
            raise ConfigError(
                f"{where} [spool] {key}: use a part of the spool above 0 and at most 1, got {value}"
            )
        setattr(s, key, float(value))

    vault = _table(doc, "vault", where)
    _known(vault, {"store", "catalog", "s3", "azure", "gcs", "abandoned_upload_days"}, f"{where} [vault]")
    s.vault_store = _str(vault, "store", where, s.vault_store)
    if not s.vault_store.startswith(("file:///", "s3://", "gs://", "az://", "azure://")):
        raise ConfigError(
            f"{where} [vault] store: use file:///path, s3://bucket/prefix, gs://bucket/prefix, "
            f"az://container/prefix or azure://account/container/prefix, not {s.vault_store!r}"
        )
    for name, cloud, endpoint in (("azure", s.azure, "account_url"), ("gcs", s.gcs, "endpoint")):
        table = _table(vault, name, where)
        what = f"{where} [vault.{name}]"
        keys = {endpoint, "part_size", "concurrency"} | ({"project"} if name == "gcs" else set())
        _known(table, keys, what)
        cloud.endpoint = table.get(endpoint) or None
        cloud.project = table.get("project") or None
        if "part_size" in table:
            cloud.part_size = parse_size(table["part_size"], f"{what} part_size")
            if cloud.part_size < 1 << 20 or cloud.part_size % (256 << 10):
                raise ConfigError(f"{what} part_size: at least 1M, in steps of 256K")
        cloud.concurrency = max(1, int(_number(table, "concurrency", where, cloud.concurrency)))
    s.catalog_url = _str(vault, "catalog", where, s.catalog_url)
    sqlite_path = s.catalog_url.removeprefix("sqlite:///") if s.catalog_url.startswith("sqlite:///") else None
    if sqlite_path and sqlite_path != ":memory:" and not sqlite_path.startswith("/"):
        # three slashes and a relative path: each command would open a catalog of its own working
        # directory, and the agent's crashes would not be where the command line reads
        raise ConfigError(
            f"{where} [vault] catalog {s.catalog_url!r} is relative to where a command runs; "
            f"for /{sqlite_path} write sqlite:////{sqlite_path} (four slashes)"
        )
    s.vault_abandoned_days = _number(vault, "abandoned_upload_days", where, s.vault_abandoned_days)
    s3 = _table(vault, "s3", where)
    s3_keys = {
        "endpoint",
        "region",
        "addressing",
        "part_size",
        "concurrency",
        "checksums",
        "credentials_file",
        "redirect_downloads",
        "public_endpoint",
        "proxy",
    }
    _known(s3, s3_keys, f"{where} [vault.s3]")
    s.s3.endpoint = s3.get("endpoint") or None
    s.s3.public_endpoint = s3.get("public_endpoint") or None
    s.s3.region = s3.get("region") or None
    s.s3.addressing = _choice(s3, "addressing", where, ("auto", "path", "virtual"), s.s3.addressing)
    s.s3.checksums = _choice(s3, "checksums", where, ("when_supported", "when_required"), s.s3.checksums)
    if "part_size" in s3:
        s.s3.part_size = parse_size(s3["part_size"], f"{where} [vault.s3] part_size")
        if s.s3.part_size < 5 << 20:
            raise ConfigError(f"{where} [vault.s3] part_size: S3 needs at least 5M")
    s.s3.concurrency = max(1, int(_number(s3, "concurrency", where, s.s3.concurrency)))
    s.s3.credentials_file = s3.get("credentials_file") or None
    s.s3.redirect_downloads = bool(s3.get("redirect_downloads", s.s3.redirect_downloads))
    if "proxy" in s3:
        s.s3.proxy = s3["proxy"]
        if not isinstance(s.s3.proxy, str) or (
            s.s3.proxy != "none" and not s.s3.proxy.startswith(("http://", "https://"))
        ):
            raise ConfigError(
                f'{where} [vault.s3] proxy: use a URL such as http://host:port, or "none" for no proxy'
            )

    agent = _table(doc, "agent", where)
    _known(
        agent,
        {"poll_interval", "metrics", "analyze", "analysis_timeout", "analysis_memory", "analysis_workers",
         "analysis_uid", "analysis_uids", "analysis_processes", "ship_batch", "ship_parallel"},
        f"{where} [agent]",
    )  # fmt: skip
    s.agent_poll = _number(agent, "poll_interval", where, s.agent_poll)
    s.agent_metrics = agent.get("metrics", s.agent_metrics)
    if not isinstance(s.agent_metrics, str):
        raise ConfigError(f'{where} [agent] metrics: a host:port such as 127.0.0.1:9464, or "" for none')
    s.agent_analyze = bool(agent.get("analyze", s.agent_analyze))
    s.agent_ship_batch = max(1, int(_number(agent, "ship_batch", where, s.agent_ship_batch)))
    s.agent_ship_parallel = max(1, int(_number(agent, "ship_parallel", where, s.agent_ship_parallel)))
    s.analysis_timeout = _number(agent, "analysis_timeout", where, s.analysis_timeout)
    if "analysis_memory" in agent:
        s.analysis_memory = parse_size(agent["analysis_memory"], f"{where} [agent] analysis_memory")
    s.analysis_workers = int(_number(agent, "analysis_workers", where, s.analysis_workers))
    s.analysis_uid = int(_number(agent, "analysis_uid", where, s.analysis_uid))
    if s.analysis_uid == 0:
        raise ConfigError(f"{where} [agent] analysis_uid: analysis never runs as root; pick an unused uid")
    s.analysis_uids = int(_number(agent, "analysis_uids", where, s.analysis_uids))
    if s.analysis_uids < 1:
        raise ConfigError(
            f"{where} [agent] analysis_uids: at least 1 (uids from analysis_uid on, unused on the host)"
        )
    s.analysis_processes = int(_number(agent, "analysis_processes", where, s.analysis_processes))
    if s.analysis_processes < 16:
        raise ConfigError(
            f"{where} [agent] analysis_processes: at least 16 (an analysis runs gdb and its threads)"
        )

    analysis = _table(doc, "analysis", where)
    keys = {"debuginfod_urls", "debuginfod_timeout", "debuginfod_max_size", "debuginfod_cache_max",
            "debug_dirs", "group_samples"}  # fmt: skip
    _known(analysis, keys | {"match_after"}, f"{where} [analysis]")
    s.group_samples = int(_number(analysis, "group_samples", where, s.group_samples))
    s.match_after = int(_number(analysis, "match_after", where, s.match_after))
    if s.match_after < 1:
        raise ConfigError(f"{where} [analysis] match_after: at least 1 analysed sample is needed to match; "
                          "use group_samples = 0 to analyse every crash in full")  # fmt: skip
    if isinstance(analysis.get("debuginfod_urls"), str):  # elfutils' DEBUGINFOD_URLS form
        s.debuginfod_urls = tuple(analysis["debuginfod_urls"].split())
    elif "debuginfod_urls" in analysis:
        s.debuginfod_urls = tuple(_strlist(analysis, "debuginfod_urls", where))
    for url in s.debuginfod_urls:
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"{where} [analysis] debuginfod_urls: use http(s):// URLs, not {url!r}")
    s.debuginfod_timeout = _number(analysis, "debuginfod_timeout", where, s.debuginfod_timeout)
    if "debuginfod_max_size" in analysis:
        what = f"{where} [analysis] debuginfod_max_size"
        s.debuginfod_max_size = parse_size(analysis["debuginfod_max_size"], what)
    if "debuginfod_cache_max" in analysis:
        what = f"{where} [analysis] debuginfod_cache_max"
        s.debuginfod_cache_max = parse_size(analysis["debuginfod_cache_max"], what)
    if "debug_dirs" in analysis:
        s.debug_dirs = tuple(_strlist(analysis, "debug_dirs", where))

    retention = _table(doc, "retention", where)
    _known(retention, {"max_age_days", "max_size", "namespace_max_size"}, f"{where} [retention]")
    if "max_age_days" in retention:
        s.retention_max_age_days = _number(retention, "max_age_days", where, 0)
    if "max_size" in retention:
        s.retention_max_size = parse_size(retention["max_size"], f"{where} [retention] max_size")
    if "namespace_max_size" in retention:
        s.retention_namespace_max_size = parse_size(
            retention["namespace_max_size"], f"{where} [retention] namespace_max_size"
        )

    #: the server's [alerts] table, checked by corevault.alerts.sinks when the server starts
    s.alerts = _table(doc, "alerts", where)

    rules = doc.get("rules", [])
    if not isinstance(rules, list):
        raise ConfigError(f"{where}: 'rules' must be an array of tables ([[rules]])")
    s.rules = [_rule(r, f"{where} rule {n + 1}") for n, r in enumerate(rules)]
    return s


def parse_targets(names: list[str], what: str) -> frozenset[str]:
    unknown = set(names) - TARGETS
    if unknown:
        raise ConfigError(f"{what}: unknown target {sorted(unknown)[0]!r}; use 'volume' and/or 'vault'")
    return frozenset(names)


def _rule(raw: object, where: str) -> Rule:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a table")
    _known(raw, {"exe", "comm", "uid", "pattern", "targets", "max_core_size"}, where)
    if "pattern" not in raw:
        raise ConfigError(f"{where}: needs a 'pattern', e.g. pattern = \"/var/crash/core-%e-%p-%t\"")
    if not any(k in raw for k in ("exe", "comm", "uid")):
        raise ConfigError(f"{where}: needs at least one of 'exe', 'comm' or 'uid' to match processes")
    from corevault import pattern

    pat = _str(raw, "pattern", where, "")
    try:
        pattern.check(pat)
    except pattern.PatternError as e:
        raise ConfigError(f"{where}: {e}") from None
    annotations = {podannotations.PATTERN: pat}
    if "targets" in raw:
        annotations[podannotations.TARGETS] = ",".join(
            sorted(parse_targets(_strlist(raw, "targets", where), f"{where} targets"))
        )
    if "max_core_size" in raw:
        annotations[podannotations.MAX_SIZE] = str(parse_size(raw["max_core_size"], f"{where} max_core_size"))
    uid = raw.get("uid")
    if uid is not None and (not isinstance(uid, int) or isinstance(uid, bool)):
        raise ConfigError(f"{where}: 'uid' must be a number")
    return Rule(raw.get("exe"), raw.get("comm"), uid, annotations)


def _known(table: dict, keys: set[str], where: str) -> None:
    for key in table:
        if key not in keys:
            raise ConfigError(f"{where}: unknown key {key!r} (known: {', '.join(sorted(keys))})")


def _table(doc: dict, key: str, where: str) -> dict:
    value = doc.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: [{key}] must be a table")
    return value


def _str(table: dict, key: str, where: str, default: str) -> str:
    value = table.get(key, default)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: {key!r} must be a non-empty string")
    return value


def _choice(table: dict, key: str, where: str, choices: tuple[str, ...], default: str) -> str:
    value = table.get(key, default)
    if value not in choices:
        raise ConfigError(f"{where}: {key!r} must be one of {', '.join(choices)}, not {value!r}")
    return value


def _strlist(table: dict, key: str, where: str) -> list[str]:
    value = table[key]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}: {key!r} must be a list of strings")
    return value


def _number(table: dict, key: str, where: str, default: float) -> float:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ConfigError(f"{where}: {key!r} must be a non-negative number, got {value!r}")
    return float(value)
