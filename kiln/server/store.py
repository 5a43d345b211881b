"""The job store: every job of kiln's job API, its parameters, state, timestamps, seeds, error, images and output
files, in one SQLite file (the standard library's `sqlite3`, WAL mode), so that jobs survive a crash or a deploy.

One small interface — `put`, `update`, `get`, `list`, `delete`, `recover`, `expire` — over plain records (dicts
of JSON values; images as PNG bytes). A deployment with several ingress replicas would implement the same
interface over a shared database (docs/server.md).

Files in the output folder are claimed by a record or do not exist: before an output file is linked into place its
path is written to the `unclaimed` table; the transaction that records the job's files removes it from there. A
crash in between leaves the path in `unclaimed`, and `recover` deletes it. Deleting a job works the same way: its
record goes and its paths become unclaimed in one transaction, then the files are removed.
"""
from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path

FINAL = ("done", "failed", "cancelled", "interrupted")
STATES = ("queued", "running") + FINAL
COLUMNS = ("id", "state", "created", "started", "finished")  # the rest of a record is JSON in `data`

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- submission order: the queue's order after a restart
    id TEXT UNIQUE NOT NULL, state TEXT NOT NULL, created REAL NOT NULL, started REAL, finished REAL,
    data TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, seq);
CREATE TABLE IF NOT EXISTS images (job_id TEXT NOT NULL, n INTEGER NOT NULL, png BLOB NOT NULL,
    PRIMARY KEY (job_id, n));
CREATE TABLE IF NOT EXISTS unclaimed (path TEXT PRIMARY KEY);
"""


class JobStore:
    """`path`: the SQLite file (":memory:" for a store that ends with the process); `files_root`: the folder the
    records' `files` are relative to (the server's --outdir)."""

    def __init__(self, path: str | Path, files_root: str | Path | None = None):
        self.path = str(path)
        self.files_root = Path(files_root) if files_root else None
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        # one connection shared by the server's threads, serialized by a lock; autocommit, explicit transactions
        self.db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        self.lock = threading.RLock()
        with self.lock:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a killed process loses nothing committed
            self.db.executescript(SCHEMA)

    def _transaction(self, work):
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                result = work(self.db)
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")
            return result

    # ------------------------------------------------------------------ records
    def put(self, record: dict, images: list[bytes] = ()):
        """A new job's record (`id`, `state`, `created` at least)."""
        row = _row(record)
        self._transaction(lambda db: (
            db.execute("INSERT INTO jobs (id, state, created, started, finished, data) VALUES (?,?,?,?,?,?)", row),
            _set_images(db, record["id"], images)))

    def update(self, job_id: str, images: list[bytes] | None = None, claim: list[str] = (), **fields):
        """Change a record's fields; `images` (when given) replace its images and `claim` takes those paths out of
        `unclaimed` — in the same transaction, so a record never names a file that is not there, or the reverse."""
        def work(db):
            old = _get(db, job_id)
            if old is None:
                return False
            db.execute("UPDATE jobs SET state=?, created=?, started=?, finished=?, data=? WHERE id=?",
                       _row({**old, **fields})[1:] + (job_id,))
            if images is not None:
                _set_images(db, job_id, images)
            db.executemany("DELETE FROM unclaimed WHERE path=?", [(p,) for p in claim])
            return True
        return self._transaction(work)

    def get(self, job_id: str) -> dict | None:
        with self.lock:
            return _get(self.db, job_id)

    def images(self, job_id: str) -> list[bytes]:
        with self.lock:
            rows = self.db.execute("SELECT png FROM images WHERE job_id=? ORDER BY n", (job_id,)).fetchall()
        return [bytes(r[0]) for r in rows]

    def list(self, state: str | None = None, limit: int = 20, before: str | None = None) -> tuple[list[dict], bool]:
        """Records newest first, `limit` of them, only `state` ones, submitted before job `before` (a cursor:
        the last id of the previous page); and whether there are more."""
        sql, args = "SELECT * FROM jobs WHERE 1=1", []
        if state:
            sql, args = sql + " AND state=?", args + [state]
        if before:
            sql, args = sql + " AND seq < (SELECT seq FROM jobs WHERE id=?)", args + [before]
        with self.lock:
            rows = self.db.execute(sql + " ORDER BY seq DESC LIMIT ?", args + [limit + 1]).fetchall()
        return [_record(r) for r in rows[:limit]], len(rows) > limit

    def delete(self, job_id: str) -> bool:
        """The record, its images and its files."""
        def work(db):
            old = _get(db, job_id)
            if old is None:
                return None
            db.execute("DELETE FROM jobs WHERE id=?", (job_id,))
            db.execute("DELETE FROM images WHERE job_id=?", (job_id,))
            db.executemany("INSERT OR IGNORE INTO unclaimed VALUES (?)", [(p,) for p in old.get("files") or ()])
            return old
        if self._transaction(work) is None:
            return False
        self.sweep()
        return True

    # ------------------------------------------------------------------ output files
    def reserve(self, paths: list[str]):
        """Paths (relative to files_root) about to be written: unclaimed until an `update(claim=...)`."""
        self._transaction(lambda db: db.executemany("INSERT OR IGNORE INTO unclaimed VALUES (?)",
                                                    [(p,) for p in paths]))

    def release(self, paths: list[str]):
        """Reserved paths that turned out to be someone else's files: never to be removed by `sweep`."""
        self._transaction(lambda db: db.executemany("DELETE FROM unclaimed WHERE path=?", [(p,) for p in paths]))

    def sweep(self) -> int:
        """Remove the unclaimed files; returns how many existed."""
        with self.lock:
            paths = [r[0] for r in self.db.execute("SELECT path FROM unclaimed").fetchall()]
        removed = 0
        for p in paths:
            if self.files_root is not None:
                target = self.files_root / p
                if target.is_file():
                    target.unlink()
                    removed += 1
            with self.lock:
                self.db.execute("DELETE FROM unclaimed WHERE path=?", (p,))
        return removed

    # ------------------------------------------------------------------ start and retention
    def recover(self) -> list[dict]:
        """After a start: a job that was running is queued again (from its first step: its partial results go),
        unclaimed and half-written files are removed; returns the queued jobs in submission order."""
        def work(db):
            running = [r[0] for r in db.execute("SELECT id FROM jobs WHERE state='running'").fetchall()]
            for job_id in running:
                db.execute("DELETE FROM images WHERE job_id=?", (job_id,))
            return running
        for job_id in self._transaction(work):
            self.update(job_id, state="queued", started=None, step=0, files=[], restarts=(
                (self.get(job_id) or {}).get("restarts", 0) + 1))
        self.sweep()
        if self.files_root is not None:  # temp files of a writer that was killed (kiln.output's ".tmp-" names)
            for folder in (self.files_root, self.files_root / "samples"):
                for tmp in folder.glob(".tmp-*") if folder.is_dir() else ():
                    tmp.unlink(missing_ok=True)
        with self.lock:
            rows = self.db.execute("SELECT * FROM jobs WHERE state='queued' ORDER BY seq").fetchall()
        return [_record(r) for r in rows]

    def expire(self, keep_days: float | None = None, keep_jobs: int | None = None) -> int:
        """Delete finished jobs older than `keep_days` or beyond the newest `keep_jobs` (with their files)."""
        marks = ",".join("?" * len(FINAL))
        doomed = set()
        with self.lock:
            if keep_days:
                cutoff = time.time() - keep_days * 86400
                doomed |= {r[0] for r in self.db.execute(
                    f"SELECT id FROM jobs WHERE state IN ({marks}) AND finished < ?", FINAL + (cutoff,))}
            if keep_jobs:
                doomed |= {r[0] for r in self.db.execute(
                    f"SELECT id FROM jobs WHERE state IN ({marks}) ORDER BY seq DESC LIMIT -1 OFFSET ?",
                    FINAL + (keep_jobs,))}
        return sum(self.delete(job_id) for job_id in doomed)

    def close(self):
        with self.lock:
            self.db.close()


def _row(record: dict) -> tuple:
    data = {k: v for k, v in record.items() if k not in COLUMNS}
    return tuple(record.get(k) for k in COLUMNS) + (json.dumps(data),)


def _record(row) -> dict:
    _, *values, data = row
    return {**dict(zip(COLUMNS, values)), **json.loads(data)}


def _get(db, job_id: str) -> dict | None:
    row = db.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
    return _record(row) if row else None


def _set_images(db, job_id: str, images):
    db.execute("DELETE FROM images WHERE job_id=?", (job_id,))
    db.executemany("INSERT INTO images VALUES (?,?,?)", [(job_id, n, png) for n, png in enumerate(images)])
