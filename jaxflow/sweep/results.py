"""Crash-safe, resumable result tables.

A table is a CSV where each key (a question_id) owns a fixed number of rows, all appended in one
write followed by fsync. Opening a table repairs what a crash can leave: a partial last line and
keys with fewer rows than they should have are removed (the file is rewritten atomically), so a
resumed run redoes exactly the unfinished keys: nothing lost, nothing duplicated.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections import Counter
from collections.abc import Iterable, Mapping


class RunMismatchError(ValueError):
    """An existing results directory was written by a run with different settings."""


def _fsync_append(path: str, text: str) -> None:
    with open(path, "a", newline="") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


class Table:
    def __init__(self, path: str, columns: list[str], rows_per_key: int, key: str = "question_id"):
        self.path, self.columns, self.rows_per_key, self.key = path, list(columns), rows_per_key, key
        self.done: set[str] = set()
        if os.path.exists(path):
            self._repair()
        else:
            self._write_all([])

    def _write_all(self, rows: list[dict]) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w", newline="") as f:
            f.write(self._format(rows, header=True))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

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
    """Creates out_dir/`name`, or checks that the existing one agrees on the `compare` keys."""
    os.makedirs(out_dir, exist_ok=True)
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
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(header, f, indent=1)
    os.replace(tmp, path)
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
