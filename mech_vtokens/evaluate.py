"""Evaluation with interventions (paper Sec. 7.2, Tables 1-3): answers generated under each named condition,
scored, one table in the paper's shape (baseline, -sinks, -dead, -matched random, -vMHA, -vFFN, ...).

    from mech_vtokens.evaluate import evaluate, paper_conditions
    conds = paper_conditions(vlm, sinks=part.token_set("sinks"), dead=part.token_set("dead"), seed=0)
    res = evaluate(vlm, "vqa.jsonl", conds, scorer="exact", max_new_tokens=10, out="runs/eval")
    res.table()        # condition, n, score, delta (vs baseline), interventions, seed
    res.answers        # one row per record x condition: prediction, answers, score

Generation is HF ``generate`` (greedy) wrapped in :func:`interventions.applied`, the supported path for every
intervention including ``Prune`` (its decode steps keep the shortened cache and positions). Conditions: a dict
``{name: [intervention, ...]}``, where an entry may also be a factory ``f(vlm, batch) -> intervention(s)``; token
sets resolve per batch. Seeds: ``torch.manual_seed(seed)`` before every generate call and every intervention's repr
(``MatchedRandom(..., seed=...)``) are recorded in ``settings`` and in the table. With ``out``, answers are written
per batch into a :class:`mech_vtokens.store.Store` (the same format, lock and atomic commits as ``run_dataset``;
table ``answers``) and a rerun resumes; ``shard=(i, n)`` splits the records over several processes.

:class:`HarnessModel` is the thin adapter for an external evaluation harness (lmms-eval style): a callable
``(images, prompts) -> texts`` that generates under fixed interventions.
"""

from __future__ import annotations

import re
import string

import torch

from .defaults import MAX_NEW_TOKENS
from .errors import InputError
from .loop import DEFAULT_BATCH_SIZE, check_images_found, counted, keywords, load_records, over_records
from .partition.partition import model_identity

SCORERS = ("exact", "contains", "choice", "auto")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize(text: str) -> str:
    """VQA-style: lower case, no punctuation, no articles, single spaces."""
    text = str(text).lower().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, answers) -> float:
    p = normalize(prediction)
    return float(any(p == normalize(a) for a in answers))


def contains(prediction: str, answers) -> float:
    p = f" {normalize(prediction)} "
    return float(any(normalize(a) and f" {normalize(a)} " in p for a in answers))


def choice_letter(prediction: str, answers, choices=None) -> float:
    """The first standalone option letter in the prediction ("B", "(B)", "B.", "answer: b") against the answer letter
    (or the answer text's position in ``choices``)."""
    letters = string.ascii_uppercase[:len(choices)] if choices else string.ascii_uppercase[:26]
    m = re.search(r"(?:^|[^A-Za-z])([A-Za-z])(?:$|[^A-Za-z])", str(prediction).strip())
    if m is None or m.group(1).upper() not in letters:
        return 0.0
    got = m.group(1).upper()
    want = set()
    for a in answers:
        a = str(a).strip()
        if len(a) == 1 and a.upper() in letters:
            want.add(a.upper())
        elif choices and normalize(a) in [normalize(c) for c in choices]:
            want.add(letters[[normalize(c) for c in choices].index(normalize(a))])
    return float(got in want)


def score(prediction: str, record, scorer="auto") -> float:
    if callable(scorer):
        return float(scorer(prediction, record.answers))
    if scorer == "auto":
        scorer = "choice" if record.choices else "exact"
    if scorer == "exact":
        return exact_match(prediction, record.answers)
    if scorer == "contains":
        return contains(prediction, record.answers)
    if scorer == "choice":
        return choice_letter(prediction, record.answers, record.choices)
    raise InputError(f"scorer={scorer!r}: choose one of {SCORERS} or pass a function (prediction, answers) -> float")


def paper_conditions(vlm, sinks=None, dead=None, seed: int = 0, layers="all", entry=(), exit=()) -> dict:
    """The paper's rows (Tables 1-3): baseline, -sinks (Prune), -dead (Prune), -matched random (Prune the same
    number of tokens per image as -dead, seeded, from the others; the paper's "-Remaining"), -vMHA / -vFFN
    (zero the attention / MLP output of every visual token at ``layers``). Rows whose token set is not given
    (``sinks`` / ``dead``: any token set, e.g. ``Partition.token_set("dead")``) are left out. ``entry``: layers k
    for Table 3's "L_in = k" rows, here at inference time (``VisualEntry(k)``: layers < k on the text only, on the
    prompt and on every generated token); ``exit``: "exit = k" rows (``VisualExit(k)``)."""
    from mech_vtokens.interventions import MatchedRandom, Prune, VisualEntry, VisualExit, ZeroSublayer

    ls = list(range(vlm.n_layers)) if layers == "all" else layers
    conds = {"baseline": []}
    if sinks is not None:
        conds["-sinks"] = [Prune(sinks)]
    if dead is not None:
        conds["-dead"] = [Prune(dead)]
        conds["-matched random"] = [Prune(MatchedRandom(dead, seed=seed))]
    conds["-vMHA"] = [ZeroSublayer("all", ls, "attn")]
    conds["-vFFN"] = [ZeroSublayer("all", ls, "mlp")]
    for k in entry:
        conds[f"L_in = {k}"] = [VisualEntry(k)]
    for k in exit:
        conds[f"exit = {k}"] = [VisualExit(k)]
    return conds


def _check_conditions(conditions) -> dict:
    from .component import Intervention

    if not isinstance(conditions, dict) or not conditions:
        raise InputError("conditions: give a dict {name: [interventions]}, e.g. {'baseline': [], '-vFFN': "
                         "[ZeroSublayer('all', [0, 1], 'mlp')]} (or mech_vtokens.evaluate.paper_conditions(vlm, ...))")
    out = {}
    for name, ivs in conditions.items():
        ivs = [ivs] if isinstance(ivs, Intervention) or (callable(ivs) and not isinstance(ivs, (list, tuple))) \
            else list(ivs)
        for iv in ivs:
            if not isinstance(iv, Intervention) and not callable(iv):
                raise InputError(f"condition {name!r}: {iv!r} is not an Intervention (probes do not change answers; "
                                 f"pass interventions such as Prune(...), ZeroSublayer(...), or f(vlm, batch) -> "
                                 f"interventions)")
        out[str(name)] = ivs
    return out


def _build(ivs, vlm, batch):
    from .component import Intervention

    out = []
    for iv in ivs:
        made = iv if isinstance(iv, Intervention) else iv(vlm, batch)
        out += list(made) if isinstance(made, (list, tuple)) else ([] if made is None else [made])
    return out


def _prompt_text(vlm, record) -> str:
    q = record.question or ""
    if record.choices:
        q = q + " " + " ".join(f"{string.ascii_uppercase[i]} . {c}" for i, c in enumerate(record.choices))
    return vlm.prompt(q)


@keywords
def answer_batch(vlm, batch, *, interventions=(), max_new_tokens: int = MAX_NEW_TOKENS, seed: int = 0) -> list[str]:
    """Greedy answers for a prepared batch under ``interventions`` (HF generate inside ``applied``)."""
    from mech_vtokens.interventions import applied

    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False)
    pad = vlm.tokenizer.pad_token_id
    if pad is not None:
        kwargs["pad_token_id"] = pad
    torch.manual_seed(seed)
    with torch.no_grad():
        if interventions:
            with applied(vlm, batch, interventions=list(interventions)):
                ids = vlm.hf.generate(**batch.inputs, **kwargs)
        else:
            ids = vlm.hf.generate(**batch.inputs, **kwargs)
    counted()  # one generation over the batch: one forward of the job (see mech_vtokens.loop.counting)
    new = ids[:, batch.inputs["input_ids"].shape[1]:]
    return [t.strip() for t in vlm.tokenizer.batch_decode(new, skip_special_tokens=True)]


def _prepare_left(vlm, images, prompts):
    # batched generation needs the prompts' ends aligned: left padding for this call only (the tokenizer unchanged)
    return vlm.prepare(images, prompts, padding_side="left")


class EvalResult:
    """``answers`` (DataFrame: record_id, condition, question, prediction, answers, score, seed), ``settings``,
    ``skipped`` ({record id: reason}); ``table()``: the paper-shaped table."""

    def __init__(self, answers, settings, skipped, batch_errors=()):
        self.answers, self.settings, self.skipped = answers, settings, skipped
        self.batch_errors = list(batch_errors)

    def table(self):
        import pandas as pd

        df = self.answers
        order = list(self.settings["conditions"])
        g = df.groupby("condition", sort=False)["score"]
        t = pd.DataFrame({"n": g.size(), "score": g.mean()}).reindex(order).reset_index()
        t = t.rename(columns={"index": "condition"})
        base = t.loc[t.condition == "baseline", "score"]
        t["delta"] = t.score - float(base.iloc[0]) if len(base) else float("nan")
        t["interventions"] = [self.settings["conditions"][c] for c in t.condition]
        t["seed"] = self.settings["seed"]
        # what the scores are over: records skipped (image missing, a batch whose conditions failed) are not in them
        t.attrs["skipped"] = dict(self.skipped)
        t.attrs["batch_errors"] = list(self.batch_errors)
        return t

    def __repr__(self) -> str:
        return f"EvalResult({len(self.answers)} answers, conditions {list(self.settings['conditions'])})"


ANSWER_COLUMNS = ["record_id", "condition", "question", "prediction", "answers", "score", "seed"]


def _check_metrics(metrics) -> list:
    """evaluate's ``metrics``: answer-metric probes (``mech_vtokens.probes.metrics``: AnswerLogProb, LogitDiff,
    ChoiceProb, KLToClean) or factories ``f(vlm, records) -> probe`` (per-record answers; the runner's factory
    shape); raise InputError otherwise."""
    from .component import Probe

    metrics = [metrics] if isinstance(metrics, Probe) or callable(metrics) and not isinstance(metrics, (list, tuple)) \
        else list(metrics)
    for m in metrics:
        if not (isinstance(m, Probe) or (callable(m) and not isinstance(m, type))):
            raise InputError(f"metrics: {m!r} is neither a metric probe (e.g. LogitDiff('yes', 'no')) nor a factory "
                             f"f(vlm, records) -> probe (e.g. lambda vlm, recs: AnswerLogProb([r.answers[0] for r in "
                             f"recs]))")
    return metrics


def _metric_columns(vlm, batch, recs, ivs, metrics) -> dict:
    """The metrics under one condition's interventions: ONE forward of the batch (``loop.forward``) -> column name
    (the result's name in ``Results``) -> one value per record (a float, or a list for per-option metrics)."""
    from .component import Probe
    from .loop import forward

    probes = [m if isinstance(m, Probe) else m(vlm, recs) for m in metrics]
    res = forward(vlm, batch, probes=probes, interventions=_build(ivs, vlm, batch))
    out = {}
    for probe in probes:  # (the Results also hold the interventions')
        name = next(n for n in res if res[n] is res[probe])
        values = getattr(res[probe], "values", None)
        if not isinstance(values, torch.Tensor) or values.shape[:1] != (len(recs),):
            raise InputError(f"metrics: {name!r} gives no value per prompt row; give answer metrics "
                             f"(mech_vtokens.probes.metrics)")
        out[name] = [float(v) if values.dim() == 1 else v.tolist() for v in values]
    return out


def _answer_step(vlm, conditions, scorer, max_new_tokens, seed, metrics=()):
    """evaluate's step of the one record loop (:func:`mech_vtokens.loop.over_records`): load a batch of records,
    generate every condition's answers, score them (and run the ``metrics`` in one forward per condition) -> the
    batch's ``answers`` rows."""
    import pandas as pd

    def step(recs) -> dict:
        ok, skipped, notes = load_records(recs)
        rows, names = [], []
        if ok:
            batch = _prepare_left(vlm, [im for _, im in ok], [_prompt_text(vlm, r) for r, _ in ok])
            for name, ivs in conditions.items():
                preds = answer_batch(vlm, batch, interventions=_build(ivs, vlm, batch), max_new_tokens=max_new_tokens,
                                     seed=seed)
                cols = _metric_columns(vlm, batch, [r for r, _ in ok], ivs, metrics) if metrics else {}
                names = list(cols)
                for i, ((r, _), p) in enumerate(zip(ok, preds)):
                    rows.append({"record_id": r.id, "condition": name, "question": r.question, "prediction": p,
                                 "answers": list(r.answers), "score": score(p, r, scorer), "seed": seed,
                                 **{c: v[i] for c, v in cols.items()}})
        frames = {"answers": pd.DataFrame(rows, columns=ANSWER_COLUMNS + names)} if ok else {}
        return {"records": [r.id for r, _ in ok], "frames": frames, "skipped": skipped, "notes": notes}

    return step


def _check_generation_args(scorer, max_new_tokens, batch_size):
    """evaluate's argument checks for the scorer, the answer length and the batch size (raise InputError)."""
    if not (scorer in SCORERS or callable(scorer)):
        raise InputError(f"scorer={scorer!r}: choose one of {SCORERS} or pass a function (prediction, answers) -> "
                         f"float")
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens={max_new_tokens!r}: give a positive int")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise InputError(f"batch_size={batch_size!r}: give a positive int")


@keywords
def evaluate(vlm, source, conditions, *, scorer="auto", max_new_tokens: int = MAX_NEW_TOKENS,
             batch_size: int = DEFAULT_BATCH_SIZE,
             seed: int = 0, out=None, progress: bool = True, limit=None, shard=None,
             on_error: str = "skip", images_dir=None, metrics=()) -> EvalResult:
    """Generate an answer for every record of ``source`` (a VQA ``.jsonl`` or a Source whose records have questions
    and answers) under every condition; score with ``scorer`` ("exact", "contains", "choice", "auto": choice when
    the record has choices, else exact; or a function); return an :class:`EvalResult`. ``out``: write answers per
    batch into a Store (``Store(out).frame("answers")``) and resume a killed run; ``shard=(i, n)``: answer only
    records i, i+n, ... (n processes with the same ``out``; the result holds every shard's answers so far);
    ``on_error="skip"`` (default): a batch whose conditions raise ``InputError`` on it (a token set empty on that
    batch) is skipped, its records in ``skipped`` with the reason and ``table().attrs["skipped"]``; ``"raise"``
    stops the run. Resuming retries skipped records. ``metrics``: answer metrics (``mech_vtokens.probes.metrics``,
    or factories ``f(vlm, records) -> metric`` for per-record answers) run under each condition in ONE extra forward of
    the batch, reduced in the trace; each adds a column (its result name, e.g. ``logit_diff``) to ``answers``."""
    import pandas as pd

    from . import data as D
    from .store import atomic_write_bytes, check_shard

    conditions = _check_conditions(conditions)
    metrics = _check_metrics(metrics)
    _check_generation_args(scorer, max_new_tokens, batch_size)
    from .token_sets import check_record_loop

    check_record_loop([iv for ivs in conditions.values() for iv in ivs], batch_size, "evaluate", vlm=vlm)
    shard = check_shard(shard)
    src = D.open_source(source, images_dir=images_dir)
    if limit is not None:
        src = D.Source(src.records[:int(limit)])
    check_images_found(src.records, "evaluate")
    no_q = [r.id for r in src if not r.question]
    no_a = [r.id for r in src if not r.answers]
    if no_q or (no_a and not callable(scorer)):
        raise InputError(f"evaluate needs a question and answer(s) per record; {(no_q or no_a)[:3]} have none: use "
                         f"a VQA .jsonl (image / question / answer) or records with question= and answers=")
    from .component import Component, Intervention

    settings = {"seed": seed, "max_new_tokens": max_new_tokens,
                "scorer": scorer if isinstance(scorer, str) else getattr(scorer, "__name__", "custom"),
                "batch_size": batch_size, "greedy": True,
                "conditions": {n: [repr(iv) if isinstance(iv, Intervention) else
                                   f"factory {getattr(iv, '__qualname__', iv)}" for iv in ivs]
                               for n, ivs in conditions.items()}}
    if metrics:  # a store resumed with other metrics is refused (its settings differ)
        settings["metrics"] = [repr(m) if isinstance(m, Component) else
                               f"factory {getattr(m, '__qualname__', m)}" for m in metrics]
    store = over_records(src.records, _answer_step(vlm, conditions, scorer, max_new_tokens, seed, metrics),
                         kind="evaluate",
                         settings=settings, tables=["answers"], out=out, shard=shard, batch_size=batch_size,
                         progress=progress, desc="evaluate", unit="q", identity=model_identity(vlm),
                         on_error=on_error)
    answers, skipped = store.frame("answers"), store.skipped
    res = EvalResult(answers if len(answers) else pd.DataFrame(columns=ANSWER_COLUMNS), settings, skipped,
                     store.batch_errors)
    if out is not None and store.complete:  # every shard done: the table of all records
        atomic_write_bytes(store.out / "table.csv", res.table().to_csv(index=False).encode())
    return res


class HarnessModel:
    """For an external evaluation harness (lmms-eval style): ``model(images, prompts) -> list[str]``, generating
    greedily under ``interventions`` (objects or factories ``f(vlm, batch)``). ``images``: one PIL image (or list)
    per prompt; a prompt without the image placeholder is wrapped in the model's prompt format."""

    def __init__(self, vlm, interventions=(), max_new_tokens: int = MAX_NEW_TOKENS, seed: int = 0,
                 batch_size: int = DEFAULT_BATCH_SIZE):
        from .errors import check_int

        _check_generation_args("auto", max_new_tokens, batch_size)  # at construction, not at the first call
        check_int(seed, "HarnessModel: seed")
        self.vlm, self.max_new_tokens, self.seed, self.batch_size = vlm, max_new_tokens, seed, batch_size
        self.interventions = _check_conditions({"model": interventions})["model"]

    def __call__(self, images, prompts) -> list[str]:
        if isinstance(prompts, str):
            prompts = [prompts]
            images = [images]
        if len(images) != len(prompts):
            raise InputError(f"{len(images)} images for {len(prompts)} prompts; pass one image (or list) per prompt")
        ph = self.vlm.image_placeholder
        texts = [p if ph in p else self.vlm.prompt(p, 1 if not isinstance(im, (list, tuple)) else len(im))
                 for im, p in zip(images, prompts)]
        out = []
        for s in range(0, len(texts), self.batch_size):
            batch = _prepare_left(self.vlm, images[s:s + self.batch_size], texts[s:s + self.batch_size])
            out += answer_batch(self.vlm, batch, interventions=_build(self.interventions, self.vlm, batch),
                                max_new_tokens=self.max_new_tokens, seed=self.seed)
        return out
