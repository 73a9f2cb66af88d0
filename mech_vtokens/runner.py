"""Runs at scale that survive: a source of images -> batches -> ONE forward per batch for every probe and
intervention -> results written incrementally to disk; a run killed at any moment resumes where it stopped.

    from mech_vtokens.runner import run_dataset
    store = run_dataset(vlm, "val2017_instances.json", probes=["embed_lens", "norms", "labels"],
                        out="runs/coco", batch_size=8)        # kill it, run the same line again: it resumes
    store.frame("embed_lens")                                 # every record's rows, keyed by record_id

The store (``out``, :mod:`mech_vtokens.store`, the same format as ``evaluate``'s): ``manifest.json`` +
``parts/<probe>/<seq>.parquet``. A RECORD is one image (one prompt row): its rows of each probe's
``Probe.record_rows(result)`` (``.to_pandas()``; LabelMatching: its per-image ``hits()``), with a ``record_id``
column first and the batch-relative columns made record-relative (``row``/``image`` 0, ``position`` without the
left padding, ``visual_index`` / ``vision_row`` from the record's first). Rows that belong to no image (LLaVA's
CLS row in NormTracker's vision rows) are not kept.
Intervention results hold nothing per record: their reprs are in the manifest's settings.

Crash safety and several writers: see :mod:`mech_vtokens.store` (atomic commits under a file lock, a kill leaves
nothing half-committed). Resume = run again with the same settings: ids already in the manifest (done or skipped)
are not redone, and the remaining records are batched exactly as an uninterrupted run would have batched them.
``shard=(i, n)``: this process runs records i, i+n, ... only (one process per GPU / per task of a job array, all
with the same ``out``); the store is complete when every shard is.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .errors import InputError
from .loop import (DEFAULT_BATCH_SIZE, DEFAULT_QUESTION, check_batch_size, check_images_found, forward, keywords,
                   load_records, over_records)
from .partition.partition import model_identity
from .store import Store, check_shard

log = logging.getLogger("mech_vtokens.runner")


# ---- probe / intervention specs --------------------------------------------------------------------------------

class _Spec:
    """A probe/intervention given as an object, a suite name (str) or a factory ``f(vlm, records)``."""

    def __init__(self, spec, kind, k):
        from .component import Intervention, Probe

        from .suite import ALL_PROBES

        self.spec, self.kind, self.k = spec, kind, k
        cls = Probe if kind == "probe" else Intervention
        if isinstance(spec, str):
            if kind != "probe" or spec not in ALL_PROBES:
                raise InputError(f"{kind} name {spec!r} is unknown; names are the suite's probes "
                                 f"({', '.join(ALL_PROBES)}); pass interventions as objects (e.g. Prune(...)) or "
                                 f"factories f(vlm, records)")
            if spec == "partition":  # a suite analysis of several passes (calibrate, classify), no probe of a forward
                raise InputError("probe name 'partition' is the suite's sink / dead / alive analysis, not a probe of "
                                 "one forward: run_dataset would drop it; use mech_vtokens.partition.calibrate(...)"
                                 ".classify(...) or `mech-vtokens analyze`, and give run_dataset the other names")
            self.name, self.desc = spec, spec
        elif isinstance(spec, cls):
            self.name, self.desc = spec.name, repr(spec)  # the key mv.run's Results uses
        elif callable(spec) and not isinstance(spec, type):
            self.name = getattr(spec, "__name__", "factory")
            self.desc = f"factory {getattr(spec, '__module__', '?')}.{getattr(spec, '__qualname__', self.name)}"
        else:
            other = "interventions=[...]" if kind == "probe" else "probes=[...]"
            raise InputError(f"{spec!r} is not a {kind}: pass {kind} objects, suite names or factories "
                             f"f(vlm, records) -> {kind} (is it meant for {other}?)")

    def build(self, vlm, records):
        from .component import Component

        if isinstance(self.spec, str):
            if self.spec == "labels":
                from mech_vtokens.probes import LabelMatching
                from mech_vtokens.probes.label_matching import label_token_ids

                labels = [[lab for lab in r.labels if label_token_ids(vlm.tokenizer, str(lab))] for r in records]
                return [LabelMatching(labels, k=self.k)] if any(labels) else []
            from .suite import build_probes

            return list(build_probes(vlm, [self.spec], self.k).values())
        if callable(self.spec) and not isinstance(self.spec, Component):
            made = self.spec(vlm, records)
            return [] if made is None else (list(made) if isinstance(made, (list, tuple)) else [made])
        return [self.spec]


def _names(specs):
    seen, out = {}, []
    for s in specs:
        n = s.name
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}_{seen[n]}")
    return out


# ---- record frames ---------------------------------------------------------------------------------------------

def record_frames(df, batch, ids):
    """Split one probe's batch frame into record rows: ``record_id`` first, batch-relative columns made
    record-relative. Returns (frame, n_rows_without_record)."""
    import numpy as np

    n = len(df)
    rows = df["row"].to_numpy() if "row" in df else np.full(n, -1)
    if "image" in df:
        img = df["image"].to_numpy()
        of_row = np.asarray(list(batch.image_of_row) + [-1])
        from_img = np.where(img >= 0, of_row[np.clip(img, -1, len(of_row) - 2)], -1)
        rows = np.where(rows >= 0, rows, from_img)
    elif "row" not in df:
        raise InputError(f"a probe result with columns {list(df.columns)} has no 'row' or 'image' column, so its "
                         f"rows cannot be assigned to records; give its to_pandas() a 'row' column")
    keep = rows >= 0
    dropped = int((~keep).sum())
    df = df.loc[keep].copy()
    rows = rows[keep]
    am = batch.inputs.get("attention_mask")
    lead = (am.cumsum(1) == 0).sum(1).numpy() if am is not None else np.zeros(len(batch), dtype=int)
    first_visual = np.concatenate([[0], batch.visual_mask.sum(1).cumsum(0).numpy()])[:-1]
    first_image = np.array([min([i for i, r in enumerate(batch.image_of_row) if r == row] or [0])
                            for row in range(len(batch))])
    if "row" in df:
        df["row"] = 0
    if "image" in df:
        im = df["image"].to_numpy()
        df["image"] = np.where(im >= 0, im - first_image[rows], im)
    if "position" in df:
        p = df["position"].to_numpy()
        df["position"] = np.where(p >= 0, p - lead[rows], p)
    if "visual_index" in df:
        v = df["visual_index"].to_numpy()
        df["visual_index"] = np.where(v >= 0, v - first_visual[rows], v)
    if "vision_row" in df:
        vr = df["vision_row"].to_numpy()
        lo = {}
        for r, x in zip(rows, vr):
            if x >= 0:
                lo[r] = min(lo.get(r, x), x)
        base = np.array([lo.get(r, 0) for r in rows])
        df["vision_row"] = np.where(vr >= 0, vr - base, vr)
    df.insert(0, "record_id", np.asarray(ids, dtype=object)[rows])
    order = np.argsort(rows, kind="stable")  # record order, each record's rows in the probe's own order
    return df.iloc[order].reset_index(drop=True), dropped


# ---- the runner ------------------------------------------------------------------------------------------------

class Runner:
    """See the module docstring and :func:`run_dataset` (the same arguments)."""

    def __init__(self, vlm, source, *, probes=(), interventions=(), out="mech-vtokens-run",
                 batch_size: int = DEFAULT_BATCH_SIZE, remote=False, question: str | None = None, k: int = 5,
                 progress: bool = True, limit=None,
                 overwrite: bool = False,
                 dtype=None, device_map=None, shard=None, on_error: str = "skip", images_dir=None):
        from . import data as D
        from .loop import ON_ERROR

        self.shard = check_shard(shard)
        if on_error not in ON_ERROR:
            raise InputError(f"on_error={on_error!r}: choose 'skip' (record a failing batch and go on) or 'raise'")
        self.on_error = on_error

        if isinstance(vlm, (str, os.PathLike)):
            from .vlm import load

            vlm = load(vlm, dtype=dtype, device_map=device_map)
        elif dtype is not None or device_map is not None:
            raise InputError("dtype / device_map apply when the runner loads the model: pass a hub id or directory "
                             "as vlm, or give them to mech_vtokens.load(...) yourself")
        if not hasattr(vlm, "prepare") or not hasattr(vlm, "adapter"):
            raise InputError(f"vlm must be a loaded model (mech_vtokens.load(...)) or a hub id / directory, not "
                             f"{type(vlm).__name__}")
        vlm.check_remote(remote)
        check_batch_size(batch_size)
        from .errors import check_int

        check_int(k, "run_dataset: k", minimum=1, fix="the top-k of the suite's lenses, e.g. k=5")  # not per batch
        if question is not None and not isinstance(question, str):
            raise InputError(f"run_dataset: question={question!r}; give the prompt text as a string (or None for "
                             f"the default)")
        if isinstance(probes, (str, bytes)) or not hasattr(probes, "__iter__"):
            probes = [probes]
        if not hasattr(interventions, "__iter__"):
            interventions = [interventions]
        self.probe_specs = [_Spec(p, "probe", k) for p in probes]
        self.iv_specs = [_Spec(i, "intervention", k) for i in interventions]
        from .token_sets import check_record_loop

        check_record_loop([s.spec for s in self.iv_specs], batch_size, "run_dataset", vlm=vlm,
                          probes=[s.spec for s in self.probe_specs])  # sites, batch-index Positions: up front
        if not self.probe_specs:
            raise InputError("run_dataset needs probes=[...] (names like 'embed_lens' or Probe objects): results on "
                             "disk are probe tables; to generate answers under interventions use "
                             "mech_vtokens.evaluate")
        self.names = _names(self.probe_specs)
        self.vlm, self.source = vlm, D.open_source(source, images_dir=images_dir)
        if limit is not None:
            self.source = D.Source(self.source.records[:int(limit)])
        if "labels" in self.names:
            D.check_labels(self.source, vlm.tokenizer)  # an unlabelled source: say so, not an empty table
        check_images_found(self.source.records, "run_dataset")
        self.out, self.batch_size, self.remote, self.k = Path(out), batch_size, remote, k
        self.question = question or DEFAULT_QUESTION
        self.progress, self.overwrite = progress, overwrite
        self.settings = {
            "family": vlm.family,  # the model itself: its weights fingerprint (over_records' identity)
            "probes": self.names, "probe_specs": [s.desc for s in self.probe_specs],
            "interventions": [s.desc for s in self.iv_specs], "batch_size": batch_size, "question": self.question,
            "k": k, "min_side": D.MIN_SIDE, "max_side": D.MAX_SIDE}  # the one size policy (data.fit_side)

    # -- one batch: the step of the one record loop (mech_vtokens.loop.over_records) --
    def _prompt(self, r):
        from .defaults import prompt

        return prompt(self.vlm, r.question or self.question)

    def _prepare(self, ok, skipped):
        """Batch through the processor; a record the processor rejects is skipped (found one by one)."""
        try:
            return ok, self.vlm.prepare([im for _, im in ok], [self._prompt(r) for r, _ in ok])
        except Exception as err:  # noqa: BLE001 - find the record(s) at fault, keep the others
            if len(ok) == 1:
                r = ok[0][0]
                skipped[r.id] = f"skipped: the processor failed ({type(err).__name__}: {err})"
                log.warning("record %s %s", r.id, skipped[r.id])
                return [], None
        good = []
        for r, im in ok:
            if self._prepare([(r, im)], skipped)[1] is not None:
                good.append((r, im))
        if not good:
            return [], None
        return good, self.vlm.prepare([im for _, im in good], [self._prompt(r) for r, _ in good])

    def _forward(self, batch, recs):
        pairs = [(n, p) for s, n in zip(self.probe_specs, self.names) for p in s.build(self.vlm, recs)]
        probes, owners = [p for _, p in pairs], [n for n, _ in pairs]
        ivs = [i for s in self.iv_specs for i in s.build(self.vlm, recs)]
        res = forward(self.vlm, batch, probes, ivs, remote=self.remote)
        return [(owner, p, res[p]) for owner, p in zip(owners, probes)]

    def run(self) -> Store:
        return over_records(self.source.records, self._step, kind="run_dataset", settings=self.settings,
                            tables=self.names, out=self.out, shard=self.shard, batch_size=self.batch_size,
                            overwrite=self.overwrite, progress=self.progress, desc="records", unit="img",
                            identity=model_identity(self.vlm), on_error=self.on_error, log=log)

    def _step(self, recs) -> dict:
        import pandas as pd

        ok, skipped, notes = load_records(recs, log)
        ok, batch = self._prepare(ok, skipped) if ok else ([], None)
        frames: dict = {}
        dropped_rows: dict = {}
        if batch is not None:
            ids = [r.id for r, _ in ok]
            for name, probe, res in self._forward(batch, [r for r, _ in ok]):
                df, dropped = record_frames(probe.record_rows(res), batch, ids)
                frames.setdefault(name, []).append(df)
                if dropped:
                    dropped_rows[name] = dropped_rows.get(name, 0) + dropped
            frames = {name: pd.concat(dfs, ignore_index=True) if len(dfs) > 1 else dfs[0]
                      for name, dfs in frames.items()}
        return {"records": [r.id for r, _ in ok], "frames": frames, "skipped": skipped, "notes": notes,
                "dropped_rows": dropped_rows}


def _runner_keywords():
    import inspect

    return set(inspect.signature(Runner.__init__).parameters) - {"self", "vlm", "source"}


@keywords(extra=_runner_keywords)
def run_dataset(vlm, source, *, probes=(), interventions=(), out="mech-vtokens-run",
                batch_size: int = DEFAULT_BATCH_SIZE, remote=False, progress: bool = True, **kwargs) -> Store:
    """Run ``probes`` (+ ``interventions``) over every record of ``source`` in batches of ``batch_size`` images,
    ONE forward per batch, writing each batch's records to ``out`` as it goes; returns the :class:`Store`.

    - ``vlm``: a loaded model, or a hub id / directory (then ``dtype=`` / ``device_map="auto"`` pass to ``load``).
    - ``source``: a folder, a COCO instances ``.json``, a VQA ``.jsonl`` or a :mod:`mech_vtokens.data` Source;
      ``images_dir``: where a JSON's image files are (default: its folder, or ``val2017/`` beside ``annotations/``
      for ``annotations/instances_val2017.json``); no image found raises ``InputError`` naming it.
    - ``probes``: Probe objects, suite names (``"embed_lens"``, ``"logit_lens"``, ``"norms"``, ``"sinks"``,
      ``"vit_sinks"``, ``"labels"`` — label matching from each record's labels) or factories ``f(vlm, records)``.
    - ``interventions``: Intervention objects or factories ``f(vlm, records)`` (token sets resolve per batch).
    - ``remote``: False, True (NDIF) or ``"local"`` (the remote path simulated here), passed to every trace.
    - ``question``: the prompt text for records without their own; ``k``: top-k of the suite's lenses;
      ``limit``: only the first n records; ``overwrite``: discard a previous run in ``out``; ``progress``: the bar.
    - ``on_error``: ``"skip"`` (default) records a batch whose forward raises ``InputError`` (a token set empty on
      that batch) as skipped with the reason (``Store.batch_errors``) and goes on; ``"raise"`` stops the run.
    - ``shard``: ``(i, n)`` runs only records i, i+n, i+2n, ... — start n processes (one per GPU, or one per task
      of a job array) with the same ``out``; see :mod:`mech_vtokens.store`.

    Run it again with the same arguments after a crash or a kill: it resumes (see the module docstring).
    """
    return Runner(vlm, source, probes=probes, interventions=interventions, out=out, batch_size=batch_size,
                  remote=remote, progress=progress, **kwargs).run()
