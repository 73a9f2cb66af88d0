"""One resumable store for every job that writes results as it goes (:func:`mech_vtokens.runner.run_dataset`,
:func:`mech_vtokens.evaluate.evaluate`), safe with several writer processes at once.

On disk (``out``): ``manifest.json`` (the only list of what is done: version, kind, settings, tables, committed parts,
skipped records) + ``parts/<table>/<seq>.parquet``. A RECORD is one source item (an image / a question); every row
of every table carries its ``record_id``.

Writers: ``Writer(out, kind, settings, tables, shard=(i, n))``. ``shard`` takes a deterministic share of the records
(positions i, i+n, i+2n, ... of the source; default: all of them), so one process per GPU or per task of a cluster
job array writes into the same ``out``. Each writer holds a lock for its shard for the whole run (a second writer of
the same shard is refused) and takes the store's manifest lock only to commit a batch: under that lock it re-reads
the manifest, drops records some other writer committed meanwhile, writes its part files and the manifest (temp
file, fsync, ``os.replace``) and releases. Commits are serialised, so part names (the manifest's part count) never
collide, no committed record is overwritten (lost) and none is committed twice (duplicated), whatever the writers'
shards. Locks are ``filelock`` locks (``flock``): the kernel drops them when a writer dies, even by SIGKILL. A kill
before the manifest lands leaves orphan parts that the next commit overwrites; readers only read listed parts.
Resume = run again with the same settings and the same model: records already done are not redone; records
skipped (an image missing or unreadable, a batch whose step failed) are tried again (``retried`` in the manifest keeps
their earlier reason). The model is checked by its weights fingerprint
(:func:`mech_vtokens.partition.model_identity`), not by the path it was loaded from.

Readers: ``Store(out)``; opening a store written in another format version raises :class:`InputError`.

Without ``out`` (``evaluate(..., out=None)``) the same loop writes into a :class:`MemoryStore`: the same commit
rules and the same reading methods, nothing on disk. The loop itself is :func:`mech_vtokens.loop.over_records`.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from .errors import InputError

MANIFEST = "manifest.json"
VERSION = 2
MANIFEST_LOCK = ".manifest.lock"


# ---- atomic files ----------------------------------------------------------------------------------------------

def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so a reader (or a kill) sees the old file or the new one, never a partial one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def write_parquet(path: Path, df) -> int:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), buf)
    data = buf.getvalue()
    atomic_write_bytes(path, data)
    return len(data)


def _read_manifest(out: Path, fix: str) -> dict | None:
    path = out / MANIFEST
    if not path.is_file():
        return None
    try:
        m = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise InputError(f"{path} is not valid JSON ({err}); it was not written by this store (its writes are "
                         f"atomic) — {fix}") from None
    if not isinstance(m, dict) or m.get("version") != VERSION:
        got = m.get("version") if isinstance(m, dict) else None
        raise InputError(f"{out} holds a store of format version {got}, this mech_vtokens reads version {VERSION}: "
                         f"{fix} (or read it with the mech_vtokens release that wrote it)")
    return m


# ---- shards ----------------------------------------------------------------------------------------------------

def check_shard(shard) -> tuple[int, int]:
    """``None`` (all records) or ``(i, n)`` with 0 <= i < n -> (i, n)."""
    if shard is None:
        return 0, 1
    ok = (isinstance(shard, (tuple, list)) and len(shard) == 2
          and all(isinstance(v, int) and not isinstance(v, bool) for v in shard) and 0 <= shard[0] < shard[1])
    if not ok:
        raise InputError(f"shard={shard!r}: give (i, n) with 0 <= i < n (this writer's share: records i, i+n, "
                         f"i+2n, ...), e.g. shard=(int(os.environ['SLURM_ARRAY_TASK_ID']), n_tasks), or None for all")
    return int(shard[0]), int(shard[1])


def shard_of(records, shard) -> list:
    """This shard's records: positions i, i+n, i+2n, ... (deterministic for the same source)."""
    i, n = check_shard(shard)
    return list(records)[i::n]


# ---- reading ---------------------------------------------------------------------------------------------------

class _Reading:
    """The reading side shared by a store on disk and one in memory: ``manifest`` + ``_read_part(file)``."""

    manifest: dict

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    @property
    def settings(self) -> dict:
        return dict(self.manifest["settings"])

    @property
    def parts(self) -> list:
        return self.manifest["parts"]

    @property
    def records(self) -> list[str]:
        return [r for p in self.parts for r in p["records"]]

    @property
    def skipped(self) -> dict:
        return dict(self.manifest["skipped"])

    @property
    def retried(self) -> dict:
        """{id: the reason it was skipped before}: skipped records a resume of this store tried again (each may be
        done now, or in ``skipped`` again with its new reason)."""
        return dict(self.manifest.get("retried", {}))

    @property
    def batch_errors(self) -> list:
        """Batches skipped whole because their step raised (``on_error="skip"``): [{"records", "reason"}]."""
        return list(self.manifest.get("batch_errors", []))

    @property
    def notes(self) -> dict:
        return dict(self.manifest["notes"])

    @property
    def tables(self) -> list[str]:
        return list(self.manifest["tables"])

    probes = tables

    @property
    def complete(self) -> bool:
        return bool(self.manifest["complete"])

    def __len__(self) -> int:
        return sum(len(p["records"]) for p in self.parts)

    def _check(self, table):
        if table not in self.tables:
            raise InputError(f"no table {table!r} in this store; it has {self.tables}")

    def iter_frames(self, table: str, columns=None):
        self._check(table)
        for p in self.parts:
            f = p["files"].get(table)
            if f is not None:
                yield self._read_part(f, columns)

    def frame(self, table: str, columns=None):
        import pandas as pd

        frames = list(self.iter_frames(table, columns))
        if not frames:
            return pd.DataFrame(columns=["record_id"])
        return pd.concat(frames, ignore_index=True)


class Store(_Reading):
    """Read a store: ``records`` (ids in the order they were committed), ``skipped`` ({id: reason}), ``notes``
    ({id: conversion done}), ``tables`` (``probes``: the same for a run_dataset store), ``settings``,
    ``complete``, ``frame(table)`` (all rows), ``iter_frames(table)`` (one DataFrame per part: memory stays flat),
    ``record(id)`` ({table: rows of that record})."""

    def __init__(self, out):
        self.out = Path(out)
        m = _read_manifest(self.out, "open the out directory it was written to, or write a new one")
        if m is None:
            raise InputError(f"{self.out} holds no run (no {MANIFEST}); run mech_vtokens.runner.run_dataset(..., "
                             f"out={str(self.out)!r}) or mech_vtokens.evaluate.evaluate(..., out=...) first")
        self.manifest = m

    def _read_part(self, f, columns=None):
        import pyarrow.parquet as pq

        return pq.read_table(self.out / f, columns=columns).to_pandas()

    def record(self, rid) -> dict:
        import pyarrow.parquet as pq

        rid = str(rid)
        for p in self.parts:
            if rid in p["records"]:
                return {name: pq.read_table(self.out / f, filters=[("record_id", "=", rid)]).to_pandas()
                        for name, f in p["files"].items()}
        raise InputError(f"record {rid!r} is not in this store (skipped: {self.manifest['skipped'].get(rid)})")

    def bytes(self) -> int:
        return sum(p.get("bytes", 0) for p in self.parts)

    def __repr__(self) -> str:
        return (f"Store({self.out}, {self.kind}, {len(self)} records, {len(self.manifest['skipped'])} skipped, "
                f"tables {self.tables}{'' if self.complete else ', incomplete'})")


# ---- writing ---------------------------------------------------------------------------------------------------

def _new_manifest(kind, settings, tables, identity=None) -> dict:
    return {"version": VERSION, "kind": kind, "settings": settings, "tables": list(tables), "parts": [],
            "skipped": {}, "notes": {}, "dropped_rows": {}, "complete": False, "started": time.time(),
            "identity": identity, "retried": {}, "batch_errors": []}


def _retry_into(m, ids) -> list:
    """Move ``ids`` from ``m["skipped"]`` to ``m["retried"]`` ({id: the earlier reason})."""
    back = [rid for rid in ids if rid in m["skipped"]]
    for rid in back:
        m.setdefault("retried", {})[rid] = m["skipped"].pop(rid)
    return back


def _done(m) -> set:
    return {r for p in m["parts"] for r in p["records"]} | set(m["skipped"])


def _commit_into(m, tables, shard, records, frames, skipped, notes, dropped_rows, write, batch_error=None) -> list:
    """Merge one batch into manifest ``m`` (the commit rules of both stores): records already done are left out
    with their rows; ``write(table, seq, frame) -> (file, bytes)`` keeps a table's rows. Returns the ids added."""
    done = _done(m)
    new = [r for r in records if r not in done]
    for rid, why in (skipped or {}).items():
        if rid not in done:
            m["skipped"][rid] = why
    for rid, note in (notes or {}).items():
        if rid in new:
            m["notes"][rid] = note
    if batch_error is not None:  # a batch skipped whole (over_records' on_error="skip"): what and why
        m.setdefault("batch_errors", []).append(batch_error)
    for name, k in (dropped_rows or {}).items():
        m["dropped_rows"][name] = m["dropped_rows"].get(name, 0) + k
    seq = len(m["parts"])
    part = {"seq": seq, "records": new, "files": {}, "rows": {}, "bytes": 0, "shard": list(shard)}
    for name, df in frames.items():
        if name not in tables:
            raise InputError(f"table {name!r} is not one of this store's tables {tables}")
        if len(new) < len(records):
            df = df[df["record_id"].isin(new)].reset_index(drop=True)
        f, nbytes = write(name, seq, df)
        part["bytes"] += nbytes
        part["files"][name], part["rows"][name] = f, len(df)
    if new:
        m["parts"].append(part)
    return new


class Writer:
    """One writer process's handle on a store (see the module docstring). Use as a context manager::

        with Writer(out, "run_dataset", settings, tables, shard=(i, n)) as w:
            todo = [r for r in shard_of(records, (i, n)) if r.id not in w.done]
            ... w.commit(ids, {table: frame}, skipped={id: reason}, notes={id: note})
            w.finish(all_ids)
    """

    def __init__(self, out, kind: str, settings: dict, tables, shard=None, overwrite: bool = False, identity=None):
        self.out, self.kind, self.settings, self.tables = Path(out), kind, settings, list(tables)
        self.shard = check_shard(shard)
        self.overwrite, self.identity = overwrite, identity
        self.manifest: dict = {}
        self._run_lock = None

    def _lock(self):
        from filelock import FileLock

        return FileLock(self.out / MANIFEST_LOCK)

    def __enter__(self) -> "Writer":
        from filelock import FileLock, Timeout

        from .data import writable_dir

        writable_dir(self.out)  # a file in the way / no permission: InputError naming the fix
        i, n = self.shard
        lock = FileLock(self.out / f".writer-{i}-of-{n}.lock")
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise InputError(f"another writer of shard {i}/{n} is writing to {self.out}; wait for it to finish or "
                             f"use another out directory (or another shard=(i, n))") from None
        self._run_lock = lock
        try:
            with self._lock():
                for tmp in self.out.rglob(".*.tmp*"):  # half-written files of a killed writer: all writes happen
                    tmp.unlink(missing_ok=True)       # under the manifest lock, which we hold
                self.manifest = self._open()
                self.manifest["complete"] = False
                self._save()
        except BaseException:
            self._release()
            raise
        return self

    def __exit__(self, *exc):
        self._release()

    def _release(self):
        if self._run_lock is not None:
            self._run_lock.release()
            self._run_lock = None

    def _open(self) -> dict:
        fix = "move it away or pass overwrite=True (or use a new out directory)"
        m = None if self.overwrite else _read_manifest(self.out, fix)
        if m is not None:
            if m["kind"] != self.kind:
                raise InputError(f"{self.out} holds a {m['kind']} store, not a {self.kind} one; use a new out "
                                 f"directory or pass overwrite=True")
            if m["settings"] != self.settings:
                diff = [k for k in sorted(set(self.settings) | set(m["settings"]))
                        if m["settings"].get(k) != self.settings.get(k)]
                raise InputError(f"{self.out} holds a run with other settings ({', '.join(diff)} differ: "
                                 f"{[m['settings'].get(k) for k in diff]} vs {[self.settings.get(k) for k in diff]}); "
                                 f"resume with the same settings, use a new out directory, or pass overwrite=True")
            self._check_identity(m)
            return m
        if self.overwrite and (self.out / "parts").is_dir():
            import shutil

            shutil.rmtree(self.out / "parts")
        return _new_manifest(self.kind, self.settings, self.tables, self.identity)

    def _check_identity(self, m) -> None:
        """The model of a resumed run must be the one that wrote the store: the same weights (fingerprint), wherever
        they were loaded from (``./llava/`` and ``llava`` resume; other weights at one path are refused)."""
        from .partition.partition import identity_diff

        saved = m.get("identity")
        if self.identity is None or saved is None:
            return
        why = identity_diff(saved, self.identity)
        if why:
            raise InputError(f"{self.out} was written by another model ({saved.get('name')!r}; {why}) than the one "
                             f"loaded now ({self.identity.get('name')!r}): resuming would mix two models in one "
                             f"store; load the model that wrote it, use a new out directory, or pass overwrite=True "
                             f"to discard the old run")

    def retry(self, ids) -> list:
        """Take ``ids`` out of the skipped list so this run tries them again (an image that was missing may be there
        now); the manifest keeps their earlier reason under ``retried``. Returns the ids retried."""
        with self._lock():
            self._reload()
            back = _retry_into(self.manifest, ids)
            self._save()
        return back

    def _save(self) -> None:
        self.manifest["updated"] = time.time()
        atomic_write_bytes(self.out / MANIFEST, json.dumps(self.manifest, indent=0).encode())

    def _reload(self) -> None:
        self.manifest = _read_manifest(self.out, "another process replaced this store while it was written")

    @property
    def done(self) -> set:
        """Ids committed (done or skipped) by any writer, as of this writer's last look at the manifest."""
        return _done(self.manifest)

    def _write_part(self, name, seq, df):
        rel = f"parts/{name}/{seq:06d}.parquet"
        (self.out / rel).parent.mkdir(parents=True, exist_ok=True)
        return rel, write_parquet(self.out / rel, df)

    def commit(self, records, frames: dict, skipped=None, notes=None, dropped_rows=None, batch_error=None) -> list:
        """Commit one batch: ``records`` (ids) with their rows ``frames`` ({table: DataFrame with record_id}),
        ``skipped`` ({id: reason}), ``notes``, ``dropped_rows`` ({table: count}). Records another writer committed
        meanwhile are left out (their rows too). Returns the ids this commit added."""
        with self._lock():
            self._reload()
            new = _commit_into(self.manifest, self.tables, self.shard, records, frames, skipped, notes,
                               dropped_rows, self._write_part, batch_error)
            self._save()  # the commit point: the batch's records (and skips) are done from here on
        return new

    def finish(self, ids) -> bool:
        """Mark the store complete when every id of ``ids`` (the whole source, all shards) is done or skipped."""
        with self._lock():
            self._reload()
            self.manifest["complete"] = set(map(str, ids)) <= self.done
            self._save()
        return self.manifest["complete"]


class MemoryStore(_Reading):
    """A store in memory: the writer interface of :class:`Writer` (``done``, ``commit``, ``finish``, a context
    manager) and the reading one of :class:`Store` (``frame``, ``records``, ``skipped``, ...), for a job run
    without ``out`` (nothing resumes: the process holds everything)."""

    def __init__(self, kind: str, settings: dict, tables, shard=None, identity=None):
        self.shard = check_shard(shard)
        self.manifest = _new_manifest(kind, settings, tables, identity)
        self._frames: dict = {}

    def __enter__(self) -> "MemoryStore":
        return self

    def __exit__(self, *exc):
        return None

    @property
    def done(self) -> set:
        return _done(self.manifest)

    def _keep(self, name, seq, df):
        key = f"{name}/{seq:06d}"
        self._frames[key] = df
        return key, 0

    def _read_part(self, f, columns=None):
        df = self._frames[f]
        return df if columns is None else df[list(columns)]

    def commit(self, records, frames: dict, skipped=None, notes=None, dropped_rows=None, batch_error=None) -> list:
        return _commit_into(self.manifest, self.tables, self.shard, records, frames, skipped, notes, dropped_rows,
                            self._keep, batch_error)

    def retry(self, ids) -> list:
        return _retry_into(self.manifest, ids)

    def finish(self, ids) -> bool:
        self.manifest["complete"] = set(map(str, ids)) <= self.done
        return self.manifest["complete"]

    def __repr__(self) -> str:
        return f"MemoryStore({self.kind}, {len(self)} records, {len(self.manifest['skipped'])} skipped)"
