"""The ONE batch loop: images + prompts -> batches -> ONE forward per batch for every probe and intervention.

Every job that runs forwards over images (``run``, ``run_dataset``, ``suite.analyze``, ``partition.calibrate`` /
``summarize`` / ``semantic_sparsity`` / ``cluster_dominance``, ``Partition.classify``, a ``PartitionGroup`` token
set resolving against a batch) is a composition of :func:`batches` and :func:`forward`:

    for start, batch in batches(vlm, images, prompts, batch_size=8, progress=True):
        lens = forward(vlm, batch, probes=[EmbedLens(k=5)], remote=remote)["embed_lens"]

- :func:`forward` counts what it runs: ``with counting() as c: ...; c.n`` is the number of forwards of the block
  (nested counters all count; the report of ``analyze`` states its count).
- ``remote`` of the running forward is in force for the forwards it starts itself (a token set that classifies the
  batch first runs on the same backend): ``forward(..., remote=None)`` inherits it.
- :func:`over_records` is the ONE resumable record loop (``run_dataset``, ``evaluate``): a source's records ->
  this shard's records not yet in the store -> batches -> ``step(records)`` (forward / generate) -> one store commit
  per batch (:mod:`mech_vtokens.store`: lock, version, shard; in memory without ``out``).
- :func:`keywords` gives the public functions one signature rule: an unknown keyword (``intervention=`` for
  ``interventions=``) or a call in an old positional order raises ``InputError`` naming the close match, before any
  work.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import inspect

from .errors import InputError

DEFAULT_BATCH_SIZE = 8  # images per forward, the one default of every batched job
DEFAULT_QUESTION = "describe the image ."



class _Job:
    """The running job's counters and backend: plain attributes (a remote trace ships this module by value, which a
    ContextVar or a thread-local would not survive)."""

    counters: tuple = ()
    remote = False


_job = _Job()


class Forwards:
    """How many forwards (traces over a batch; one ``generate`` trace counts one) ran while counting: ``n``."""

    def __init__(self):
        self.n = 0

    def __repr__(self) -> str:
        return f"Forwards({self.n})"


@contextlib.contextmanager
def counting():
    """``with counting() as c:`` -> ``c.n`` forwards ran inside the block (through :func:`forward` / ``run`` /
    ``generate``)."""
    c = Forwards()
    before = _job.counters
    _job.counters = before + (c,)
    try:
        yield c
    finally:
        _job.counters = before


def counted() -> None:
    """Record one forward on every active counter (called by each trace the package runs)."""
    for c in _job.counters:
        c.n += 1


@contextlib.contextmanager
def remote_of(remote):
    """Make ``remote`` the backend of the forwards started inside (``forward(..., remote=None)``)."""
    before, _job.remote = _job.remote, remote
    try:
        yield remote
    finally:
        _job.remote = before


def current_remote():
    """The backend of the running job (False outside any)."""
    return _job.remote


def forward(vlm, batch, probes=(), interventions=(), remote=None):
    """ONE forward of ``probes`` and ``interventions`` over a prepared ``batch``: their ``Results`` (keyed by
    component name, indexable by the component). ``remote=None``: the backend of the job this forward runs in
    (local outside any)."""
    import nnsight

    remote = current_remote() if remote is None else remote
    vlm.check_remote(remote)
    with remote_of(remote):  # token sets resolved while planning run their own forwards on the same backend
        exp = vlm.experiment(batch, probes, interventions)
        with vlm.trace(**batch.inputs, remote=remote):
            raw = nnsight.save(exp.execute(vlm.model))
        counted()
    return exp.results(raw)


def check_batch_size(batch_size, name="batch_size") -> int:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise InputError(f"{name}={batch_size!r}: give a positive int (images per forward)")
    return batch_size


def inputs(vlm, images, prompts):
    """(images, prompts) as lists of the same length: ``prompts=None`` is the default question for every image, one
    string is used for all."""
    from .data import is_image

    images = [images] if is_image(images) else list(images) if images is not None else []  # one image: a list of one
    if not images:
        raise InputError("no images given: pass a list of PIL images")
    if prompts is None:
        prompts = [vlm.prompt(DEFAULT_QUESTION)] * len(images)
    elif isinstance(prompts, str):
        prompts = [prompts] * len(images)
    prompts = list(prompts)
    if len(prompts) != len(images):
        raise InputError(f"{len(prompts)} prompts for {len(images)} images: give one prompt per image, one string "
                         f"for all, or None for the default")
    return images, prompts


def batches(vlm, images, prompts, batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = False,
            processor_kwargs=None, desc: str = "batches"):
    """Yield ``(start, batch)``: ``batch`` the prepared images[start:start + batch_size] with their prompts; a tqdm
    bar when ``progress``. Inputs are checked before the first batch is prepared."""
    from tqdm.auto import tqdm

    images, prompts = inputs(vlm, images, prompts)
    check_batch_size(batch_size)
    starts = range(0, len(images), batch_size)
    for start in tqdm(starts, desc=desc, unit="batch", disable=not progress):
        sl = slice(start, start + batch_size)
        yield start, vlm.prepare(images[sl], prompts[sl], **(processor_kwargs or {}))


# ---- the one resumable record loop -------------------------------------------------------------------------------

def load_records(records, log=None):
    """Load each record's image (``data.load_image``: the conversion and size policy ``vlm.prepare`` applies too):
    ``(ok, skipped, notes)`` with ``ok`` the ``(record, image)`` pairs, ``skipped`` / ``notes`` ({id: reason /
    conversion done}) for the store's commit."""
    ok, skipped, notes = [], {}, {}
    for r in records:
        im, note = r.load()
        if im is None:
            skipped[r.id] = note
            if log is not None:
                log.warning("record %s %s", r.id, note)
        else:
            if note:
                notes[r.id] = note
                if log is not None:
                    log.info("record %s: %s", r.id, note)
            ok.append((r, im))
    return ok, skipped, notes


ON_ERROR = ("skip", "raise")


def check_images_found(records, fn: str = "run_dataset", sample: int = 32) -> None:
    """Up front: when none of the first ``sample`` records' image files exists, the images are elsewhere (a COCO
    JSON in ``annotations/`` with the images in ``val2017/``): an ``InputError`` naming ``images_dir=``."""
    import os
    from pathlib import Path

    paths = [Path(r.image) for r in list(records)[:sample] if isinstance(r.image, (str, os.PathLike))]
    if paths and not any(p.is_file() for p in paths):
        raise InputError(f"{fn}: none of the first {len(paths)} records' images exists (e.g. {paths[0]}); the "
                         f"source's image paths are relative to its file's folder {paths[0].parent}: pass "
                         f"images_dir='path/to/val2017' (the folder holding the image files)")


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a resumable run: the message says how many records are committed and how to resume."""


def _step_or_skip(step, recs, on_error, log) -> dict:
    """One batch's ``step``; with ``on_error="skip"`` an ``InputError`` of that batch (e.g. a token set empty on
    it) skips the batch's records with the reason instead of ending the run."""
    try:
        return step(recs)
    except InputError as err:
        if on_error == "raise":
            raise
        ids = [r.id for r in recs]
        why = f"skipped: its batch failed ({err}); over_records(on_error='raise') stops on it instead"
        if log is not None:
            log.warning("batch of records %s skipped: %s", ids, err)
        return {"records": [], "skipped": {rid: why for rid in ids},
                "batch_error": {"records": ids, "reason": str(err)}}


def _todo(records, w) -> list:
    """This shard's records to run: those not done, as an uninterrupted run batches them, then the ones skipped
    before (retried: an image missing then may be there now) in batches of their own, so the batches of the
    others stay those of an uninterrupted run."""
    mine = records[w.shard[0]::w.shard[1]]
    skipped, done = set(w.manifest["skipped"]), w.done
    todo = [r for r in mine if r.id not in done]
    again = [r for r in mine if r.id in skipped]
    if again:
        w.retry([r.id for r in again])
    return todo, again


def over_records(records, step, *, kind: str, settings: dict, tables, out=None, shard=None,
                 batch_size: int = DEFAULT_BATCH_SIZE, overwrite: bool = False, progress: bool = False,
                 desc: str = "records", unit: str = "record", identity=None, on_error: str = "skip", log=None):
    """Run ``step`` over ``records`` in batches and commit each batch's rows as it goes; returns the store
    (:class:`~mech_vtokens.store.Store` of ``out``, or a :class:`~mech_vtokens.store.MemoryStore` without ``out``).

    ``step(batch_records) -> {"records": ids done, "frames": {table: DataFrame with record_id}, "skipped": {id:
    reason}, "notes": {...}, "dropped_rows": {table: n}}`` (all but ``records`` optional) is one batch's work: load,
    prepare, forward or generate. Only this ``shard``'s records (``(i, n)``: positions i, i+n, ...) that the store
    does not hold yet (done by any writer) are run, batched as an uninterrupted run batches them, so a killed run
    resumes with no record lost or duplicated; records skipped before are retried after them. The store is marked
    complete when every record is in.

    - ``identity``: the model's weights fingerprint (:func:`mech_vtokens.partition.model_identity`); a store written
      by other weights is refused (``overwrite=True`` discards it).
    - ``on_error``: ``"skip"`` (default): a batch whose step raises ``InputError`` (a token set empty on that
      batch, ...) is skipped whole, its records listed in ``skipped`` with the reason and in ``batch_errors``, and
      a summary is logged at the end; ``"raise"``: the error ends the run (what was committed stays).
    - Ctrl-C: raises :class:`Interrupted` ("interrupted; N/M records done; run the same call again to resume");
      every committed batch stays committed."""
    from tqdm.auto import tqdm

    from .store import MemoryStore, Store, Writer

    if on_error not in ON_ERROR:
        raise InputError(f"on_error={on_error!r}: choose 'skip' (record the failing batch and go on) or 'raise'")
    records = list(records)
    check_batch_size(batch_size)
    writer = (Writer(out, kind, settings, tables, shard, overwrite, identity=identity) if out is not None
              else MemoryStore(kind, settings, tables, shard, identity=identity))
    with writer as w:
        todo, again = _todo(records, w)
        n_mine = len(records[w.shard[0]::w.shard[1]])
        bar = tqdm(total=n_mine, initial=n_mine - len(todo) - len(again), unit=unit, desc=desc,
                   disable=not progress, smoothing=0.1)
        try:
            for group in (todo, again):
                for start in range(0, len(group), batch_size):
                    recs = group[start:start + batch_size]
                    done = _step_or_skip(step, recs, on_error, log)
                    w.commit(done["records"], done.get("frames", {}), skipped=done.get("skipped"),
                             notes=done.get("notes"), dropped_rows=done.get("dropped_rows"),
                             batch_error=done.get("batch_error"))
                    bar.update(len(recs))
                    bar.set_postfix(skipped=len(w.manifest["skipped"]), refresh=False)
        except KeyboardInterrupt:
            n_done = len({r.id for r in records[w.shard[0]::w.shard[1]]} & w.done)
            raise Interrupted(f"interrupted; {n_done}/{n_mine} records done (committed in {out or 'memory'}); run "
                              f"the same call again to resume" + ("" if out is not None else
                                                                    " (with out=... to keep the work)")) from None
        finally:
            bar.close()
        w.finish(r.id for r in records)
        _summary(w, log)
    return Store(out) if out is not None else writer


def _summary(w, log) -> None:
    errs = w.manifest.get("batch_errors", [])
    if errs:
        import logging

        n = sum(len(e["records"]) for e in errs)
        (log or logging.getLogger("mech_vtokens")).warning(
            "%d batch(es) (%d records) were skipped because their step failed, e.g. %s; they are listed in the "
            "store's batch_errors / skipped", len(errs), n, errs[0]["reason"])


# ---- one signature rule -----------------------------------------------------------------------------------------

def _params(fn):
    sig = inspect.signature(fn)
    named = [p.name for p in sig.parameters.values()
             if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and not p.name.startswith("_")]
    return sig, named


def unknown_keyword(fn_name, key, known) -> InputError:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]}=?" if close else f"its keywords are {', '.join(known)}"
    return InputError(f"{fn_name}() got the unknown keyword {key}=; {hint} (processor options go in "
                      f"processor_kwargs={{...}} where the function takes them)")


def check_common(fn: str, kwargs) -> None:
    """The keywords every public function shares, one rule each (before any work): ``processor_kwargs`` a dict,
    ``progress`` / ``overwrite`` True or False, ``limit`` a positive int (or None: every record), ``seed`` an int,
    ``num_beams`` / ``num_return_sequences`` (HF generation) positive ints."""
    from collections.abc import Mapping

    from .errors import check_flag, check_int

    pk = kwargs.get("processor_kwargs")
    if pk is not None and not isinstance(pk, Mapping):
        raise InputError(f"{fn}: processor_kwargs={pk!r}; give a dict of processor options, e.g. "
                         f"processor_kwargs={{'max_pixels': 200704}}")
    for flag in ("progress", "overwrite"):
        if flag in kwargs:
            check_flag(kwargs[flag], f"{fn}: {flag}")
    if kwargs.get("limit") is not None:  # limit=-1 read as records[:-1] dropped the last record without a word
        check_int(kwargs["limit"], f"{fn}: limit", minimum=1, fix="the number of records to run, or None for all")
    if "seed" in kwargs:
        check_int(kwargs["seed"], f"{fn}: seed")
    for count in ("num_beams", "num_return_sequences"):  # HF's error for 0 names a streamer, not the value
        if kwargs.get(count) is not None:
            check_int(kwargs[count], f"{fn}: {count}", minimum=1, fix="1 for greedy / sampling")


def keywords(fn=None, *, extra=None, old=None):
    """Decorator: unknown keywords and calls that do not fit ``fn``'s signature raise ``InputError`` (naming the
    close match / the signature) before ``fn`` runs. ``extra()``: further names accepted by ``fn``'s ``**kwargs``
    (those it passes on, e.g. HF ``generate``'s); without ``extra`` a ``**kwargs`` accepts nothing unknown.
    ``old(args, kwargs)``: a message when the call is in an old argument order (checked first)."""
    if fn is None:
        return lambda f: keywords(f, extra=extra, old=old)
    sig, named = _params(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        msg = old(args, kwargs) if old is not None else None
        if msg:
            raise InputError(msg)
        passed_on = set(extra()) if extra is not None else set()
        for key in kwargs:
            if key not in named and key not in passed_on:
                raise unknown_keyword(fn.__name__, key, named)
        try:
            sig.bind(*args, **kwargs)
        except TypeError as err:
            plain = sig.replace(parameters=[p.replace(annotation=p.empty) for p in sig.parameters.values()
                                            if p.kind != p.VAR_KEYWORD], return_annotation=sig.empty)
            shown = str(plain)
            raise InputError(f"{fn.__name__}(): {err}; call it as {fn.__name__}{shown} (everything after the data "
                             f"is keyword-only: probes=[...], interventions=[...], ...)") from None
        check_common(fn.__name__, kwargs)
        return fn(*args, **kwargs)

    return wrapper
