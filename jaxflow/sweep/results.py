"""Crash-safe, resumable result tables, one writer each.

A table is a CSV where each key (a question_id) owns a fixed number of rows, all appended in one
write followed by fsync. Opening a table repairs what a crash can leave: a partial last line and
keys with fewer rows than they should have are removed (the file is rewritten atomically), so a
resumed run redoes exactly the unfinished keys: nothing lost, nothing duplicated. A write that fails
(full disk, file size limit) is taken back and raises ResultsWriteError. A run holds a `RunLock` on
its directory while it writes, so a second run into the same directory refuses instead of
duplicating rows.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import fcntl
import io
import json
import os
import socket
from collections import Counter
from collections.abc import Iterable, Mapping


class RunMismatchError(ValueError):
    """An existing results directory was written by a run with different settings."""


class RunLockedError(ValueError):
    """Another live process is writing into the results directory."""


class ResultsWriteError(OSError):
    """A results file could not be written (full disk, file size limit, I/O error)."""


@contextlib.contextmanager
def _writing(path: str):
    try:
        yield
    except OSError as e:
        if isinstance(e, ResultsWriteError):
            raise
        raise ResultsWriteError(f"cannot write {path}: {e.strerror or e}; the samples recorded so far are intact: "
                                "free space and run the same command again to resume") from e


def _fsync_append(path: str, text: str) -> None:
    """Appends `text` whole or not at all: a failed write is truncated away before raising."""
    data = memoryview(text.encode())
    with _writing(path):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        try:
            end = os.fstat(fd).st_size
            try:
                while data:
                    data = data[os.write(fd, data):]
                os.fsync(fd)
            except OSError:
                with contextlib.suppress(OSError):  # if even this fails, opening the table repairs it
                    os.ftruncate(fd, end)
                raise
        finally:
            os.close(fd)


def _write_atomic(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with _writing(path):
        with open(tmp, "w", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


class RunLock:
    """An exclusive lock on a results directory (`out/name`), held from `acquire` until `release` or
    the holder's death: the kernel drops a flock when its process dies, so a stale lock file is
    simply taken over. The file holds the holder's pid, host and start time for the refusal message.

    On NFS, Linux emulates flock with POSIX byte-range locks that the server enforces across
    clients (unless mounted with `nolock` or `local_lock=flock`, which make locks host-local); a
    crashed client's lock lasts until the server's lease for it expires (NFSv4: about 90 s). With
    POSIX semantics, closing any descriptor of the file drops the lock: the holder never reopens it."""

    def __init__(self, out_dir: str, name: str = "run.lock"):
        self.path = os.path.join(out_dir, name)
        self.fd: int | None = None

    def acquire(self) -> RunLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RunLockedError(f"{os.path.dirname(self.path)}: in use by {self.holder()}; a second writer "
                                     "would duplicate its rows: wait for it to end or use another --out") from None
            except OSError as e:
                raise OSError(e.errno, f"cannot lock {self.path}: {e.strerror} (a file system without locks, "
                                       "e.g. NFS mounted with nolock?)") from e
            info = {"pid": os.getpid(), "host": socket.gethostname(),
                    "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
            with _writing(self.path):  # we hold it now: the previous holder's info goes
                os.ftruncate(fd, 0)
                os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        return self

    def holder(self) -> str:
        """The holder as written in the lock file."""
        try:
            with open(self.path) as f:
                info = json.loads(f.read() or "{}")
        except (OSError, ValueError):
            info = {}
        if "pid" not in info:
            return f"a process that has not yet written its pid to {self.path}"
        return f"process {info['pid']} on host {info.get('host', '?')} (since {info.get('started', '?')}, {self.path})"

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the lock; the file stays (unlinking it races)
            self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class Table:
    def __init__(self, path: str, columns: list[str], rows_per_key: int, key: str = "question_id"):
        self.path, self.columns, self.rows_per_key, self.key = path, list(columns), rows_per_key, key
        self.done: set[str] = set()
        if os.path.exists(path):
            self._repair()
        else:
            self._write_all([])

    def _write_all(self, rows: list[dict]) -> None:
        _write_atomic(self.path, self._format(rows, header=True))

    def _format(self, rows: Iterable[Mapping], header: bool = False) -> str:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self.columns, extrasaction="raise", lineterminator="\n")
        if header:
            writer.writeheader()
        writer.writerows(rows)
        return buf.getvalue()

    def _repair(self) -> None:
        with open(self.path, newline="") as f:
            original = text = f.read()
        if text and not text.endswith("\n"):
            text = text[: text.rfind("\n") + 1]  # a crash mid-line
        reader = csv.DictReader(io.StringIO(text))
        if reader.fieldnames is not None and list(reader.fieldnames) != self.columns:
            raise RunMismatchError(f"{self.path}: columns {reader.fieldnames} differ from {self.columns}")
        rows = list(reader)
        counts = Counter(r[self.key] for r in rows)
        self.done = {k for k, n in counts.items() if n == self.rows_per_key}
        kept = [r for r in rows if r[self.key] in self.done]
        if original != self._format(kept, header=True):
            self._write_all(kept)

    def append(self, key: str, rows: list[dict]) -> None:
        """All rows of one key, in one write. The key must not be done already."""
        if key in self.done:
            raise ValueError(f"{self.path}: {self.key} {key} is already recorded")
        if len(rows) != self.rows_per_key:
            raise ValueError(f"{self.path}: {self.key} {key} has {len(rows)} rows, expected {self.rows_per_key}")
        _fsync_append(self.path, self._format(rows))
        self.done.add(key)

    def read(self) -> list[dict]:
        with open(self.path, newline="") as f:
            return list(csv.DictReader(f))


def open_run(out_dir: str, header: dict, compare: Iterable[str], name: str = "run.json") -> dict:
    """Creates out_dir/`name`, or checks that the existing one agrees on the `compare` keys. The caller
    holds the directory's RunLock."""
    path = os.path.join(out_dir, name)
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        diff = [k for k in compare if old.get(k) != header.get(k)]
        if diff:
            raise RunMismatchError(f"{path}: this directory holds a run with other settings ({', '.join(diff)}: "
                                   f"{[old.get(k) for k in diff]} vs {[header.get(k) for k in diff]}); "
                                   "use another --out")
        old.setdefault("resumed", []).append(header.get("started"))
        header = old
    _write_atomic(path, json.dumps(header, indent=1))
    return header


def merge_shards(out: str, name: str, columns: list[str], per_key: int, procs: int) -> Table:
    """Merges the per-process tables into `name`.csv (rebuilt from the shards each time)."""
    path = os.path.join(out, f"{name}.csv")
    if os.path.exists(path):
        os.remove(path)
    merged = Table(path, columns, per_key)
    for pid in range(procs):
        rows = Table(os.path.join(out, f"{name}.process-{pid}-of-{procs}.csv"), columns, per_key).read()
        by_key: dict[str, list[dict]] = {}
        for r in rows:
            by_key.setdefault(r["question_id"], []).append(r)
        for key, key_rows in by_key.items():
            if key not in merged.done:
                merged.append(key, key_rows)
    return merged
