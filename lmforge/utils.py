"""Small helpers shared across lmforge: atomic writes, output-path checks, UTF-8 reads, file modes, run metadata,
devices."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import shutil
import secrets
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NamedTuple, TypeVar

from lmforge.errors import ConfigError, LmforgeError

T = TypeVar("T")


def temp_name(path: Path) -> Path:
    """The temporary beside `path` that a writer fills before renaming it onto `path`: `.<name>.<pid>-<random>.tmp`
    (atomic_path, TokenShardWriter), so that `remove_stale_temps` knows a killed writer's leftovers by name."""
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


_TEMP = re.compile(r"\.(.+)\.[\w-]+\.tmp")  # temp_name's form (and the older .<name>.<pid>.tmp / mkstemp ones)


def remove_stale_temps(paths: Iterable[str | Path]) -> int:
    """Remove the temporary files that killed writers left beside `paths` (the outputs a run is about to write);
    returns how many. Only a temporary of one of these names is touched, never another file in the folders."""
    by_dir: dict[Path, set[str]] = {}
    for p in map(Path, paths):
        by_dir.setdefault(p.parent, set()).add(p.name)
    removed = 0
    for folder, names in by_dir.items():
        if not folder.is_dir():
            continue
        for entry in os.scandir(folder):  # one listing per folder: a run has thousands of shards
            m = _TEMP.fullmatch(entry.name)
            if m and m[1] in names and entry.is_file(follow_symlinks=False):
                Path(entry.path).unlink(missing_ok=True)
                removed += 1
    return removed


def output_path_problem(path: str | Path, *, file: bool = False) -> tuple[str, Path | None] | None:
    """What keeps a writer from using `path` as an output directory (with `file`, an output file), as (problem,
    what is in the way), or None: ("empty", None); ("directory", path) where a file is meant; ("file", path), an
    existing file where a directory is meant; ("under", f): the path lies under f, an existing file; ("readonly",
    d): d, the existing directory the writers would create or write in, cannot be written (a read-only mount, no
    permission). Each would fail mid-run with a traceback. check_output_path words it; a command with words of its
    own (lmforge generate) asks this."""
    if not str(path):  # before Path(): Path("") is "."
        return "empty", None
    path = Path(path)
    there = next((p for p in (path, *path.parents) if p.exists()), None)
    if there is not None and there.is_dir() and not (there == path and file) \
            and not os.access(there, os.W_OK | os.X_OK):  # EROFS or EACCES, for root too on a read-only mount
        return "readonly", there
    if there is None or there.is_dir():
        return ("directory", path) if there == path and file else None
    if there != path:
        return "under", there
    return None if file else ("file", path)


def check_output_path(path: str | Path, name: str, *, flag: str | None = None, file: bool = False,
                      want: str | None = None) -> Path:
    """Refuse, before any work, an output path a command could not write (`output_path_problem`): empty, an
    existing file where a directory is meant (with `file`, a directory where a file is), or a path under an
    existing file. `name` is the setting (run_dir, --out), `flag` the option that sets it when that differs,
    `want` what to set it to when the command takes less than a new or existing directory (or a file path)."""
    setting = f"{name} ({flag})" if flag else name
    want = want or ("a file path" if file else "a new or existing directory")
    problem = output_path_problem(path, file=file)
    path = Path(path)
    if problem is None:
        return path
    kind, there = problem
    if kind == "empty":
        raise ConfigError(f"{name} is empty; set {setting} to {want}")
    if kind == "directory":
        raise ConfigError(f"{name} {str(path)!r} is a directory, not a file; set {setting} to {want}")
    if kind == "readonly":
        raise ConfigError(f"{name} {str(path)!r} cannot be written: {str(there)!r} is not writable by this user; "
                          f"make it writable, or set {setting} to a {'path' if file else 'directory'} you can write")
    what = "is an existing file" if kind == "file" else f"lies under {str(there)!r}, an existing file"
    raise ConfigError(f"{name} {str(path)!r} {what}, not a directory; set {setting} to {want}, or move the file "
                      "away")


def input_files(patterns: Iterable[str | Path]) -> list[Path]:
    """Input files named by paths, directories and glob patterns: a directory gives every file below it, sorted,
    less hidden ones (a checkout's .git objects, .DS_Store; named outright, a hidden file is read); each file once
    (`data data/a.txt` names a.txt twice). A path or pattern that names no file is a DataError, as is naming none.
    What the tokenizer's and the data pipeline's inputs both go through."""
    import glob

    from lmforge.errors import DataError

    out: list[Path] = []
    for pat in map(str, patterns):
        p = Path(pat)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.is_file()
                           and not any(part.startswith(".") for part in q.relative_to(p).parts))
            if not found:
                raise DataError(f"input directory {pat} holds no file (hidden files and directories are skipped)")
            out += found
        elif p.is_file():
            out.append(p)
        else:
            hits = sorted(Path(h) for h in glob.glob(pat, recursive=True) if Path(h).is_file())
            if not hits:
                raise DataError(f"input not found: {pat} (no such file or directory, and no file matches it as a "
                                "glob pattern)")
            out += hits
    if not out:
        raise DataError("no input files given")
    seen: set[Path] = set()
    return [f for f in out if not (f.resolve() in seen or seen.add(f.resolve()))]


def read_utf8(path: str | Path, what: str, *, want: str = "a text file",
              error: type[LmforgeError] = ConfigError) -> str:
    """The text of the file `path`, read as UTF-8 (a leading byte-order mark dropped: a Windows editor's, no part
    of the text). A directory, a missing or unreadable file, or bytes that are not UTF-8 raise one line of `error`
    (ConfigError for a config file, DataError for data) naming `what` (the file's setting: 'config file',
    '--prompts-file'), the path and the fix; `want` is what to give instead of a directory ('a TOML or JSON
    file')."""
    path = Path(path)
    if path.is_dir():
        raise error(f"{what} {path} is a directory; give {want}")
    try:
        raw = path.read_bytes()  # not is_file() first: a pipe (<(cmd), /dev/stdin) is read too
    except FileNotFoundError:
        raise error(f"{what} {path} not found") from None
    except OSError as e:
        raise error(f"{what} {path} cannot be read: {e.strerror}") from None
    bom = 3 if raw.startswith(b"\xef\xbb\xbf") else 0  # (a Windows editor's byte-order mark is no part of the text)
    try:
        return raw[bom:].decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{what} {path} is not UTF-8 text (byte {e.start + bom}: {e.object[e.start:e.end]!r}); save it "
                    "as UTF-8") from None


def read_record(path: str | Path, advice: str, what: str | None = None) -> Any:
    """A JSON record lmforge wrote for itself (a pipeline run's pipeline.json and markers, a token shard's record).
    One that is damaged (written atomically, so not by a kill: a disk fault, an edit) is a one-line ConfigError
    naming it (`what`, default "PATH, one of the run's own records,") and `advice` (what redoes or removes it), not a
    JSONDecodeError traceback."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        what = what or f"{path}, one of the run's own records,"
        raise ConfigError(f"{what} is corrupt ({e}); {advice}") from None


def file_stamps(paths: Iterable[str | Path]) -> tuple[tuple[str, int, int], ...]:
    """(resolved path, size, mtime_ns) of each of `paths` that exists (a folder too: its mtime changes when a file in
    it is added, removed or replaced by a rename): the key of a cache of what the files hold, so a file changed in
    the process is read again (keyed on its name alone, the old contents were given for the rest of the process),
    and one file named two ways (relative, absolute, through a symlink) is one entry."""
    out = []
    for p in paths:
        try:
            st = os.stat(p)
        except OSError:  # (missing: what reads the files says so)
            continue
        out.append((str(Path(p).resolve()), st.st_size, st.st_mtime_ns))
    return tuple(out)


class CacheInfo(NamedTuple):
    """What `once_per_file`'s `cache_info()` gives (functools.lru_cache's fields)."""

    hits: int
    misses: int
    maxsize: int | None
    currsize: int


def once_per_file(load: Callable[..., T] | None = None, *, files_of: Callable[..., Iterable[str | Path]] | None = None):
    """`load(name, *args)` cached for the process while the files `name` stands for stay as they are: one entry per
    (resolved name, args), holding `file_stamps(files_of(name, *args))` (default: the file `name` itself) beside what
    was loaded, and loaded again, replacing it, when those stamps change (a fastText model retrained over its file, a
    tokenizer saved again: keyed on the path alone, the old contents were given for the rest of the process). A
    relative and an absolute name, `./x` or a symlink are one entry (each name held its own copy of a multi-GB model);
    `load` gets the name as the caller wrote it (its errors name what the user typed). A name that stands for no file
    ("byte", "pkg.mod:factory") is loaded once. Bounded by the names used: a pipeline's models are a fixed set every
    shard uses (a cache of 4 met 5 fastText stages in a cycle and read every model again for every shard).
    `cache_clear` frees them (`pipeline.release_checked_models`); `cache_info` counts as functools.lru_cache's.
    Use as `@once_per_file` or `@once_per_file(files_of=...)`."""
    if load is None:
        return functools.partial(once_per_file, files_of=files_of)
    held: dict[tuple, tuple[tuple, T]] = {}
    counts = [0, 0]  # hits, misses

    @functools.wraps(load)
    def by_file(name, *args) -> T:
        names = [name] if isinstance(name, (str, Path)) else list(name)  # (a tuple of paths: decontam's eval_paths)
        key = (tuple(str(Path(n).resolve()) for n in names), *args)
        stamps = file_stamps(files_of(name, *args) if files_of is not None else names)
        entry = held.get(key)
        if entry is not None and entry[0] == stamps:
            counts[0] += 1
            return entry[1]
        counts[1] += 1
        held.pop(key, None)  # (the old contents go before the new are read: one copy of a large model at a time)
        held[key] = entry = (stamps, load(str(name) if isinstance(name, Path) else name, *args))
        return entry[1]

    def cache_clear() -> None:
        held.clear()
        counts[:] = [0, 0]

    by_file.cache_clear = cache_clear
    by_file.cache_info = lambda: CacheInfo(counts[0], counts[1], None, len(held))
    return by_file


def sha256_file(path: str | Path) -> str:
    """sha256 of a file's bytes, read whole (see remembered_sha256 for a file read again and again)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


HASH_CACHE_ENV = "LMFORGE_HASH_CACHE"


def remembered_sha256(path: Path) -> str:
    """sha256_file of a large file read at many starts (a HF base's weights no manifest lists, a data pipeline's
    models), remembered on disk under its path, size, modification time and inode ($LMFORGE_HASH_CACHE, default
    ~/.cache/lmforge/sha256/): a 14 GB base is read once, not at every load of adapters over it or every pipeline
    resume and Ray worker. A file rewritten in place has a new modification time and is read again. (Checksum
    verification of an lmforge checkpoint, checkpoint.store._verify, always reads.)"""
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}".encode()).hexdigest()
    try:
        root = Path(os.environ.get(HASH_CACHE_ENV) or Path.home() / ".cache" / "lmforge" / "sha256")
    except RuntimeError:  # no home directory (HOME unset, a uid without a passwd entry): read, not remembered
        return sha256_file(path)
    try:
        known = (root / key).read_text()
        if len(known) == 64:
            return known
    except OSError:
        pass
    digest = sha256_file(path)
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".{key}.{os.getpid()}"
        tmp.write_text(digest)
        os.replace(tmp, root / key)
    except OSError:  # a read-only home: the checksum is still right, only not remembered
        pass
    return digest


@once_per_file
def content_digest(path: str) -> str:
    """sha256 of a file's bytes (of a folder: its entries' sorted names, what its mtime stands for), read once per
    process while the file's stamps stay as they are (once_per_file) and once per machine while they and its inode
    do (remembered_sha256): what tells a file touched, or copied with its bytes, from one changed, where a stamp's
    time moved but its size did not (pipeline.describe_changes)."""
    if Path(path).is_dir():
        return hashlib.sha256("\0".join(sorted(os.listdir(path))).encode("utf-8", "surrogateescape")).hexdigest()
    return remembered_sha256(Path(path))


def umask() -> int:
    """The process umask, read without changing it where Linux reports it (setting it to read it would
    race with threads creating files)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(path: str | Path) -> None:
    """Give `path` (a file, or a folder and everything below it) the modes a plain open() / mkdir would:
    writers such as safetensors' save_file create 0600 files, which would make a shared run folder or an
    export unreadable to collaborators."""
    mask, path = umask(), Path(path)
    for p in [*(path.rglob("*") if path.is_dir() else ()), path]:
        if not p.is_symlink():
            p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


@contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """`values` in os.environ while the block runs (for the processes it starts, which inherit them), then each
    variable as it was (unset where it was unset)."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` (`.<name>.<pid>-<random>.tmp`, created empty); on success it is
    renamed onto `path` (atomic on POSIX), on failure it is removed, so readers never see a half-written file.
    The file gets the mode a plain open() gives (0666 less the umask): mkstemp's 0600 would make a shared run
    folder unreadable to collaborators. An OSError that names no file (a write's: a full disk) is raised again
    naming `path`, the file the user knows (naming_file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = temp_name(path)
    os.close(os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # the kernel applies the umask
    try:
        with naming_file(path):
            yield tmp_path
            os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


@contextmanager
def naming_file(path: str | Path) -> Iterator[None]:
    """An OSError raised in the block that names no file (a write's: a full disk's ENOSPC) is raised again naming
    `path`, the file the user knows; one that names its file passes as it is."""
    try:
        yield
    except OSError as e:
        if e.errno is not None and e.filename is None:
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise


def proc_stat(pid: int | str) -> list[str] | None:
    """The fields of Linux's /proc/PID/stat after "pid (comm)": state, parent pid, ..., start time at [19]; None
    where there is none (not Linux, or the process has ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def process_tag(pid: int) -> str | None:
    """8 hex digits that tell process `pid` apart from any other that had or will have its PID: a hash of this
    host's name, its boot and the process's start time (Linux /proc; elsewhere the host's name only). None: no
    live process has that PID here. A writer names its leftovers PID-TAG, so that a later process that reuses
    the PID (common after a reboot or in a container, whose PIDs start again from 1) is not taken for it."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:  # another user's: alive
        pass
    fields = proc_stat(pid)
    if fields and fields[0] in "ZX":  # exited, not yet reaped
        return None
    try:
        start, boot = fields[19], Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except (OSError, IndexError, TypeError):
        start = boot = ""
    import hashlib
    import socket

    return hashlib.blake2b(f"{socket.gethostname()}|{boot}|{start}".encode(), digest_size=4).hexdigest()


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """A hidden directory beside `path` to write into, renamed onto `path` when the block succeeds (what was
    there moved aside first and removed after) and removed when it fails: `path` is whole or untouched. Their
    names, `.NAME.writing-PID-TAG` and `.NAME.replaced-PID-TAG` (process_tag), tell a killed writer's leftovers
    from a live one's (lmforge.checkpoint.clean_partial)."""
    path = Path(path)
    me = f"{os.getpid()}-{process_tag(os.getpid())}"
    tmp, old = (path.parent / f".{path.name}.{what}-{me}" for what in ("writing", "replaced"))
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        moved = path.exists() or path.is_symlink()  # (a link to nowhere too: a directory is not renamed onto it)
        if moved:
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            if moved:
                os.replace(old, path)
            raise
        if moved and old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        elif moved:  # a file, or a link (to a directory too: the link is replaced, what it points to is left)
            old.unlink()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json_atomic(path: str | Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def git_hash() -> str | None:
    """The git commit of the lmforge source tree, if it is a checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def run_metadata() -> dict[str, Any]:
    import platform

    import lmforge

    return {"lmforge_version": lmforge.__version__, "git_hash": git_hash(), "python": platform.python_version()}


def pick_device(name: str = "auto", cpu: str = "--device cpu") -> str:
    """'auto' -> 'cuda' when available, else 'cpu'. Any other name is checked against what this torch
    build and machine offer, so a wrong one is a one-line error instead of a traceback mid-run. cpu: how the
    caller's user asks for the CPU instead (the errors' fix)."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    hint = "use 'cpu', 'cuda', 'cuda:N', 'mps' or 'auto'"
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device {name!r} is not a device torch knows; {hint}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else "no GPU is visible"
            raise ConfigError(f"device {name!r}: CUDA is not available (torch {torch.__version__}, {build}); "
                              f"use {cpu}")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError(f"device {name!r}: Apple MPS is not available here; use {cpu}")
    elif dev.type != "cpu":
        raise ConfigError(f"device {name!r} is not supported by lmforge; {hint}")
    elif dev.index not in (None, 0):
        raise ConfigError(f"device {name!r}: the CPU is one device, 'cpu' (its cores are threads, not devices); "
                          f"use {cpu}")
    return name


INLINE_BYTES = 2 << 20
"""inputs below this many bytes are processed in this process: starting workers would cost more (and a
script without an `if __name__ == "__main__":` guard, which spawned workers re-import, still runs)"""


def process_pool(workers: int, *, worker_setup=None, **kwargs):
    """A multiprocessing Pool whose workers do not inherit this process's threads: 'forkserver' where the
    platform has it, else 'spawn'. A plain fork copies the locks of every running thread (torch's
    intra-op pool, tqdm's monitor, a gloo group) mid-use, so a forked worker can deadlock; Python 3.14
    drops fork as the default for that reason. Worker functions and their arguments must be picklable
    and importable (module level). Such workers re-run the main script's top level: a script without an
    `if __name__ == "__main__":` guard would start pools in every worker, endlessly (the pool replaces each
    dying worker), so there the work runs in this process instead, with a notice (`InlinePool`; it runs
    `initializer` but not `worker_setup`, what only a worker process should do, e.g. ignore Ctrl-C)."""
    import multiprocessing as mp

    problem = main_reimport_problem()
    if problem is not None:
        import warnings

        warnings.warn(f"lmforge runs this work in one process instead of {workers}: worker processes re-run the main "
                      f"script's top level, and {problem} to use worker processes", stacklevel=3)
        return InlinePool(**kwargs)
    if worker_setup is not None:
        if kwargs.get("initializer") is not None:
            raise ValueError("process_pool: give worker_setup or initializer, not both")
        kwargs["initializer"] = worker_setup
    methods = mp.get_all_start_methods()
    return mp.get_context("forkserver" if "forkserver" in methods else "spawn").Pool(workers, **kwargs)


def main_reimport_problem() -> str | None:
    """None where spawned workers may import the main module: it is no script (an interactive session, -c), a
    package's `__main__` module (`python -m lmforge`: multiprocessing never re-runs one in its workers,
    `multiprocessing.spawn._fixup_main_from_name`), or a file whose source guards its top level with
    `if __name__ == "__main__"` (a text check of the file); else what is wrong, as the end of a sentence. A script
    read from standard input (`python - <<EOF`: __file__ '<stdin>') cannot be: the workers try to run a file of
    that name, fail, and the pool starts them again without end."""
    import re
    import sys

    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and (spec.name == "__main__" or spec.name.endswith(".__main__")):
        return None
    path = getattr(spec, "origin", None) if spec is not None else getattr(main, "__file__", None)
    if not path:
        return None
    if not os.path.isfile(path):
        return (f"it was read from {path}, no file they can read again; save it as a file, its code under an "
                "`if __name__ == \"__main__\":` guard,")
    try:
        source = Path(path).read_text(errors="replace")
    except OSError:
        return None
    if re.search(r"__name__\s*==\s*['\"]__main__['\"]|['\"]__main__['\"]\s*==\s*__name__", source):
        return None
    return "it has no `if __name__ == \"__main__\":` guard; put the script's code under that guard"


class _Done:
    """An AsyncResult that was ready at once (InlinePool.apply_async)."""

    def __init__(self, value):
        self.value = value

    def get(self, timeout=None):
        return self.value

    def ready(self) -> bool:
        return True


class InlinePool:
    """The multiprocessing.Pool methods lmforge uses, run in this process (process_pool's fallback)."""

    def __init__(self, initializer=None, initargs=()):
        if initializer is not None:
            initializer(*initargs)

    def imap(self, fn, items, chunksize: int = 1):
        return map(fn, items)

    imap_unordered = imap

    def apply_async(self, fn, args=(), kwds=None) -> "_Done":
        return _Done(fn(*args, **(kwds or {})))

    def close(self) -> None:
        pass

    join = terminate = close

    def __enter__(self) -> "InlinePool":
        return self

    def __exit__(self, *exc) -> None:
        pass


def compute_dtype(model):
    """The floating-point dtype a model computes in: its first floating-point parameter's (else buffer's), so a
    quantized layer's integer codes (an int8 / NF4 embedding, packed int4 weights) never decide it. torch's
    default dtype for a model with no floating-point tensor."""
    import torch

    for tensors in (model.parameters(), model.buffers()):
        for t in tensors:
            if t.is_floating_point():
                return t.dtype
    return torch.get_default_dtype()


def to_device(data, device, dtype=None):
    """`data` (a host tensor, or what torch.tensor takes) on `device`, without waiting for the work already
    queued there. A plain host-to-GPU copy (`torch.tensor(x, device='cuda')`, `.to('cuda')`) synchronises
    the stream first, so the host would wait for the step in flight: async scheduling (lmforge.infer.pending)
    launches a step's inputs while the previous step runs. Host memory is pinned (PyTorch caches pinned
    blocks and keeps each until its copy is done), then copied non-blocking."""
    import torch

    t = data if isinstance(data, torch.Tensor) else torch.tensor(data, dtype=dtype)
    device = torch.device(device if device is not None else "cpu")
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def copy_in(dst, src) -> None:
    """Copy host tensor `src` into device tensor `dst` in place, without a stream sync (as to_device)."""
    dst.copy_(src.pin_memory() if dst.is_cuda else src, non_blocking=True)


class HostCopy:
    """Device tensors (None allowed) copied to pinned host memory behind the work queued so far; `get()`
    waits for those copies only. A plain `.tolist()` / `.cpu()` of a CUDA tensor waits for everything queued
    on the stream, so reading step t's tokens after launching step t + 1 would wait for t + 1 as well and
    undo async scheduling's overlap (lmforge.infer.pending). On the CPU the tensors are kept as they are."""

    def __init__(self, *tensors):
        import torch

        self.event = None
        if any(t is not None and t.is_cuda for t in tensors):
            self.tensors = tuple(None if t is None else torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                                 .copy_(t, non_blocking=True) for t in tensors)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.tensors = tensors

    def get(self) -> tuple:
        """The host tensors, once their copies are done."""
        if self.event is not None:
            self.event.synchronize()
            self.event = None
        return self.tensors


@contextmanager
def eval_mode(model) -> Iterator[None]:
    """The module in eval mode within the context (no dropout, MoE noise or MTP losses), even when a Trainer
    that shares it has put it in train mode; every submodule's own mode comes back after, error or not."""
    if not model.training:  # already in eval mode: nothing to switch
        yield
        return
    modes = [(m, m.training) for m in model.modules()]  # submodules a trainer keeps in eval stay so
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def capture_cuda_graph(fn, pool=None):
    """(graph, fn()'s output) with fn recorded in a new torch.cuda.CUDAGraph (pool: a memory pool shared with
    other graphs). A capture that fails raises its error with the process as it was before it: when the capture
    cannot end (an op CUDA forbids during capture, e.g. a device sync), torch.cuda.graph (torch 2.11) leaves its
    capture stream current and the CUDA random generators in capture mode, and every later random draw then
    fails ("Offset increment outside graph capture encountered unexpectedly"). Here the previous stream is
    restored and a trivial capture ends the generators' capture mode, so a caller that falls back to eager
    steps (the engine's graphs, the batch-1 kernel step) keeps serving."""
    import torch

    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.current_stream()
    try:
        with torch.cuda.graph(graph, pool=pool):
            out = fn()
    except BaseException:
        torch.cuda.set_stream(stream)
        with contextlib.suppress(RuntimeError), torch.cuda.graph(torch.cuda.CUDAGraph()):
            torch.zeros(1, device=stream.device)
        torch.cuda.set_stream(stream)
        raise
    return graph, out


def compiler_disable(fn):
    """`@torch.compiler.disable` without importing torch._dynamo (with sympy and triton, ~2 s) when the decorated
    module loads: a model or kernel module then loads in a process that never compiles without paying for dynamo.

    While torch._dynamo is not imported, nothing can be compiling, so `fn` runs as it is. Under torch.compile
    the call goes through torch's own lazy form of the decorator (torch._disable_dynamo, which imports dynamo at
    its first call): a graph break there, `fn` run eagerly, as @torch.compiler.disable gives. The break reason
    dynamo reports is "Attempted to call function marked as skipped" (the wrapper lives in torch/_compile.py)
    rather than "Skip calling torch.compiler.disable()d function"."""
    import functools
    import sys

    import torch

    disabled = torch._disable_dynamo(fn)

    @functools.wraps(fn)
    def call(*args, **kwargs):
        # is_compiling() first: Dynamo folds it to True while tracing and never looks at sys.modules
        if not torch.compiler.is_compiling() and "torch._dynamo" not in sys.modules:
            return fn(*args, **kwargs)
        return disabled(*args, **kwargs)

    return call
