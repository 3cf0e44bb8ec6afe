"""A content-addressed cache of model outputs and heatmaps, in one SQLite file.

Keys hash everything a value depends on (the model's weights and settings, the image's bytes,
the method and its params, the target class), so a rerun that changes only rules or report
settings recomputes nothing, and a run killed at any point resumes from its last committed
batch. Every blob carries its checksum: a corrupted entry is detected, dropped and recomputed,
never trusted. Values are small (float16 heatmaps at the analysis resolution, probabilities),
so memory stays flat however large the data set: rules read heatmaps back on demand.
A file damaged as a whole (its header or pages garbage) is found when opened, moved aside and
rebuilt empty; ``Store.notice`` then says so, for the run's warnings.
"""
from __future__ import annotations

import hashlib
import json
import sqlite3
import time
import zlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from auditor.inputs.config import ConfigError


def digest(*parts) -> str:
    return hashlib.sha256("\x1f".join(json.dumps(p, sort_keys=True, default=str) for p in parts).encode()).hexdigest()


def _checksum(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


class CacheError(ConfigError):
    """The cache file cannot be opened at all (not: is damaged); one line for the user."""


class Store:
    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.corrupt = 0
        self.notice: str | None = None  # set when a damaged file was moved aside and rebuilt
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CacheError(f"run.cache: cannot create the cache folder {self.path.parent}: {e.strerror or e}") from None
        try:
            self.db = self._open()
        except sqlite3.OperationalError as e:  # locked, unwritable, a folder: not damage, do not touch it
            raise CacheError(f"run.cache: cannot open the cache {self.path}: {e}") from None
        except sqlite3.DatabaseError as e:     # not a database, malformed pages: damage
            aside = self._set_aside()
            self.notice = (f"the cache {self.path} was damaged ({e}); it was moved to {aside.name} and rebuilt, "
                           f"so everything in this run was computed afresh")
            self.db = self._open()

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(str(self.path), check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")      # readers never block the writer; crash-safe
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("CREATE TABLE IF NOT EXISTS blobs (key TEXT PRIMARY KEY, dtype TEXT, shape TEXT, "
                       "data BLOB, checksum TEXT)")
            db.execute("SELECT key, dtype, shape, data, checksum FROM blobs LIMIT 0")
            problems = [r[0] for r in db.execute("PRAGMA quick_check(3)").fetchall()]
            if problems != ["ok"]:
                lines = [ln for p in problems for ln in p.splitlines() if ln.strip() and not ln.startswith("***")]
                raise sqlite3.DatabaseError(f"database disk image is malformed: {'; '.join(lines[:2])[:160]}")
        except BaseException:
            db.close()
            raise
        return db

    def _set_aside(self) -> Path:
        """Rename the damaged file (and its WAL files) beside itself; return the new name."""
        aside = self.path.with_name(f"{self.path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
        n = 1
        while aside.exists():
            n += 1
            aside = aside.with_name(f"{self.path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}-{n}")
        self.path.rename(aside)
        for suffix in ("-wal", "-shm"):
            side = Path(f"{self.path}{suffix}")
            if side.exists():
                side.rename(Path(f"{aside}{suffix}"))
        return aside

    def get(self, key: str) -> np.ndarray | None:
        row = self.db.execute("SELECT dtype, shape, data, checksum FROM blobs WHERE key=?", (key,)).fetchone()
        if row is None:
            return None
        dtype, shape, data, checksum = row
        try:
            if _checksum(data) != checksum:
                raise ValueError("checksum mismatch")
            return np.frombuffer(zlib.decompress(data), dtype=dtype).reshape(json.loads(shape))
        except (ValueError, zlib.error):
            self._drop([key])
            return None

    def _drop(self, keys: list[str]) -> None:
        """Delete damaged entries (they are then recomputed) and count them."""
        self.corrupt += len(keys)
        with self.db:
            self.db.executemany("DELETE FROM blobs WHERE key=?", [(k,) for k in keys])

    def get_many(self, keys: list[str]) -> dict[str, np.ndarray]:
        out = {}
        for k in keys:
            v = self.get(k)
            if v is not None:
                out[k] = v
        return out

    def has_many(self, keys: list[str]) -> set[str]:
        """The keys whose entries are present and intact: checksums are checked as ``get`` does (a
        damaged entry is dropped, so it gets recomputed) but nothing is decompressed."""
        found, bad = set(), []
        for start in range(0, len(keys), 500):  # SQLite caps the parameters of one statement
            part = keys[start:start + 500]
            rows = self.db.execute(f"SELECT key, data, checksum FROM blobs WHERE key IN ({','.join('?' * len(part))})",
                                   part).fetchall()
            for key, data, checksum in rows:
                (found.add if _checksum(data) == checksum else bad.append)(key)
        if bad:
            self._drop(bad)
        return found

    def put_many(self, items: dict[str, np.ndarray]) -> None:
        """Write and commit in one transaction (a batch is either all there or not at all)."""
        rows = []
        for key, arr in items.items():
            arr = np.ascontiguousarray(arr)
            data = zlib.compress(arr.tobytes(), 1)
            rows.append((key, arr.dtype.str, json.dumps(arr.shape), data, _checksum(data)))
        with self.db:
            self.db.executemany("INSERT OR REPLACE INTO blobs VALUES (?, ?, ?, ?, ?)", rows)

    def get_json(self, key: str):
        """A JSON value stored with ``put_json``, or None."""
        hit = self.get(key)
        return None if hit is None else json.loads(hit.tobytes())

    def put_json(self, key: str, value, default=None) -> None:
        self.put_many({key: np.frombuffer(json.dumps(value, default=default).encode(), np.uint8)})

    def absorb(self, shard: Path) -> int:
        """Copy another store file's entries (a Ray worker's shard) into this one; delete the shard.

        Entries keep their checksums, so a shard damaged on disk is caught when read."""
        self.db.execute("ATTACH DATABASE ? AS shard", (str(shard),))
        try:
            # A worker stopped before it made its table leaves an empty shard: nothing to copy.
            made = self.db.execute("SELECT 1 FROM shard.sqlite_master WHERE type='table' AND name='blobs'").fetchone()
            with self.db:
                n = self.db.execute("INSERT OR IGNORE INTO blobs SELECT * FROM shard.blobs").rowcount if made else 0
        finally:
            self.db.execute("DETACH DATABASE shard")
        for suffix in ("", "-wal", "-shm"):
            Path(f"{shard}{suffix}").unlink(missing_ok=True)
        return n

    def close(self) -> None:
        self.db.close()


class ShardedStore:
    """A worker's view: look up in the shared store and its own shard, write to its shard only.

    Workers never write to the shared file, so many processes (on many machines, with the run
    folder on a shared filesystem) can work at once; the driver absorbs the shards."""

    def __init__(self, shared: Path, shard: Path):
        self.shared, self.shard_path, self._shard = Store(shared), shard, None

    @property
    def shard(self) -> Store:
        """The worker's own file, made at its first write: a worker that Ray starts late and
        stops unused leaves no file behind for the driver to absorb."""
        if self._shard is None:
            self._shard = Store(self.shard_path)
        return self._shard

    def get_many(self, keys: list[str]) -> dict[str, np.ndarray]:
        out = self.shared.get_many(keys)
        rest = [k for k in keys if k not in out]
        return out | (self._shard.get_many(rest) if self._shard and rest else {})

    def has_many(self, keys: list[str]) -> set[str]:
        found = self.shared.has_many(keys)
        rest = [k for k in keys if k not in found]
        return found | (self._shard.has_many(rest) if self._shard and rest else set())

    def put_many(self, items: dict[str, np.ndarray]) -> None:
        if items:
            self.shard.put_many(items)


class LazyMaps(Mapping):
    """Sample id → heatmap, read from the store when asked for (float32)."""

    def __init__(self, store: Store, keys: dict[int, str]):
        self.store, self.keys = store, keys

    def __getitem__(self, i: int) -> np.ndarray:
        v = self.store.get(self.keys[i])
        if v is None:
            raise KeyError(f"heatmap for sample {i} is missing from the cache")
        return v.astype(np.float32)

    def __iter__(self):
        return iter(self.keys)

    def __len__(self) -> int:
        return len(self.keys)

    def __contains__(self, i) -> bool:
        return i in self.keys
