"""Metrics of the answer, reduced INSIDE the forward at ``unembed.hook_out`` (the logits, after every intervention of
the run): the quantities activation patching and ablations are scored with (issue 17; the paper's causal tests,
Secs. 4.3 and 7.2, score answers the same way, through accuracy).

One module for a family of small probes (each class is a few lines over one shared reader; the rule "one public
class per file" is kept per metric in spirit: every class computes one number per row):

- :class:`AnswerLogProb` — log p(answer | prompt) at each row's last attended position. Multi-token answers are
  TEACHER-FORCED: append the answer to the prompt and pass ``forced=True``; the metric then sums
  ``log p(a_j | prompt, a_<j)`` over the answer's tokens, which are the row's last tokens (checked before the
  forward). A multi-token answer without ``forced=True`` is refused.
- :class:`LogitDiff` — ``logit[a] - logit[b]`` at the last position (raw logits, the usual patching metric).
- :class:`ChoiceProb` — the probability of each option among ``options`` (softmax over the options' logits only),
  plus its probability under the full vocabulary.
- :class:`KLToClean` — KL(p_clean || p_row) of the next-token distributions, where the clean distribution is ANOTHER
  ROW of the same batch (``clean=0``: row 0 is the clean run): patching puts clean and patched rows in one forward,
  so no second run is needed.

Answers are token ids (ints) or strings, tokenised with the model's tokenizer without special tokens (a tokenizer
that marks word starts, e.g. sentencepiece's "▁red", wants the string as it follows the prompt: ``" red"``). One
answer for every row, or a list with one per row (for :class:`AnswerLogProb` a list of ints is ONE answer's tokens;
for the one-token metrics :class:`LogitDiff` / :class:`ChoiceProb` it is one id per row). Each result is a
:class:`MetricResult`: ``values`` (batch,) or (batch, n) on the CPU, ``to_pandas()`` a long table with a ``row``
column (so the runner stores it per record).
"""

from __future__ import annotations

import torch

from mech_vtokens.component import Probe, rows_for
from mech_vtokens.errors import InputError
from mech_vtokens.results import Result


# ---- outside the trace: answers -> ids ---------------------------------------------------------------------------

def _ids_of(vlm, answer, who: str) -> list[int]:
    """One answer (a string, an int id, or a list of int ids) as its token ids."""
    if isinstance(answer, str):
        ids = vlm.processor.tokenizer(answer, add_special_tokens=False)["input_ids"]
        if not ids:
            raise InputError(f"{who}: the answer {answer!r} tokenises to no token; give a non-empty string or ids")
        return [int(i) for i in ids]
    if isinstance(answer, (int,)) and not isinstance(answer, bool):
        return [int(answer)]
    if isinstance(answer, (list, tuple)) and answer and all(isinstance(i, int) and not isinstance(i, bool)
                                                           for i in answer):
        return [int(i) for i in answer]
    raise InputError(f"{who}: cannot read {answer!r} as an answer; give a string, a token id, or a list of ids")


def _per_row(vlm, answers, n_rows: int, who: str) -> list[list[int]]:
    """``answers`` (one answer for all rows, or a list of one per row) as one id list per row."""
    per_row = isinstance(answers, (list, tuple)) and answers and not all(
        isinstance(i, int) and not isinstance(i, bool) for i in answers)
    if not per_row:
        return [_ids_of(vlm, answers, who)] * n_rows
    if len(answers) != n_rows:
        raise InputError(f"{who}: {len(answers)} answers for {n_rows} prompts; give one answer for all rows or one "
                         f"per row")
    return [_ids_of(vlm, a, who) for a in answers]


def _single(vlm, answers, n_rows: int, who: str) -> torch.Tensor:
    """(rows,) ids of single-token answers; a multi-token answer is refused, naming the fix. A list of ints is one
    id PER ROW here (a one-token metric reads no several-token answer)."""
    if isinstance(answers, (list, tuple)) and answers and all(
            isinstance(i, int) and not isinstance(i, bool) for i in answers):
        answers = [[i] for i in answers]
    rows = _per_row(vlm, answers, n_rows, who)
    for ids in rows:
        if len(ids) != 1:
            raise InputError(f"{who}: an answer is {len(ids)} tokens ({ids}); this metric reads one next token. Use "
                             f"AnswerLogProb(..., forced=True) with the answer appended to the prompt, or give the "
                             f"answer's first token")
    return torch.tensor([r[0] for r in rows], dtype=torch.long)


def _check_vocab(vlm, ids: torch.Tensor, who: str) -> None:
    vocab = vlm.hf.get_output_embeddings().weight.shape[0]
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise InputError(f"{who}: token ids {ids.unique().tolist()[:8]} lie outside the vocabulary (0..{vocab - 1})")


# ---- inside the trace (torch only) -------------------------------------------------------------------------------

def last_positions(value, ctx):
    """Each row's last attended position of the logits ``value`` (batch, seq, vocab): the last 1 of the attention
    mask (left or right padding), or the last position when HF kept only the last logits."""
    n, s = value.shape[0], value.shape[1]
    am = ctx.get("attention_mask")
    if am is None or am.shape[-1] != s:
        return torch.full((n,), s - 1, dtype=torch.long, device=value.device)
    pos = torch.arange(s, device=value.device)
    return (rows_for(am, n).to(value.device).bool() * pos).amax(1)


def last_logits(value, ctx):
    """(batch, vocab) float32 logits at each row's last attended position."""
    rows = torch.arange(value.shape[0], device=value.device)
    return value[rows, last_positions(value, ctx)].float()


# ---- the result --------------------------------------------------------------------------------------------------

class MetricResult(Result):
    """A metric's numbers: ``values`` (batch,) or (batch, n) float32 on the CPU; ``to_pandas()``: one row per prompt
    row (and option), columns ``row``, ``metric``, the metric's own keys, ``value``."""

    def __init__(self, metric: str, values, columns=None):
        self.name = metric
        self.metric = metric
        self.values = values
        self.columns = columns or {}  # extra per-row (or per-row-and-option) columns

    def to_pandas(self):
        import pandas as pd

        v = self.values
        if v.dim() == 1:
            df = pd.DataFrame({"row": range(len(v)), "metric": self.metric, "value": v.numpy()})
            for k, col in self.columns.items():
                df[k] = list(col)
            return df
        n, m = v.shape
        df = pd.DataFrame({"row": [r for r in range(n) for _ in range(m)], "metric": self.metric,
                           "option": [j for _ in range(n) for j in range(m)], "value": v.reshape(-1).numpy()})
        for k, col in self.columns.items():  # one entry per (row, option), row-major
            df[k] = list(col)
        return df


# ---- the metrics -------------------------------------------------------------------------------------------------

class AnswerLogProb(Probe):
    """log p(answer) at each row's last attended position (one token), or teacher-forced over the answer's tokens
    at the end of the prompt (``forced=True``: ``sum_j log p(a_j | prompt, a_<j)``)."""

    def __init__(self, answers, forced: bool = False):
        self.answers = answers
        self.forced = bool(forced)

    def sites(self, vlm):
        return ["unembed.hook_out"]

    def _rows(self, vlm, batch):
        rows = _per_row(vlm, self.answers, len(batch), "AnswerLogProb")
        _check_vocab(vlm, torch.tensor([i for r in rows for i in r]), "AnswerLogProb")
        if not self.forced:
            _single(vlm, self.answers, len(batch), "AnswerLogProb")
            return rows
        ids, am = batch.inputs["input_ids"], batch.ctx.get("attention_mask")
        for r, ans in enumerate(rows):
            real = ids[r][am[r].bool()] if am is not None else ids[r]
            if len(real) <= len(ans) or real[-len(ans):].tolist() != ans:
                raise InputError(f"AnswerLogProb(forced=True): prompt row {r} does not end with the answer's tokens "
                                 f"{ans}; append the answer to the prompt (prompt + answer text) so the forward "
                                 f"teacher-forces it")
        return rows

    def check(self, vlm, batch):
        self._rows(vlm, batch)

    def extras(self, vlm, batch):
        rows = self._rows(vlm, batch)
        k = max(len(r) for r in rows)
        ids = torch.full((len(rows), k), -1, dtype=torch.long)
        for r, a in enumerate(rows):
            ids[r, :len(a)] = torch.tensor(a)
        return {"ids": ids}

    def at(self, site, value, ctx, out):
        ids = rows_for(ctx["mine"]["ids"], value.shape[0]).to(value.device)  # beams: each copy as its prompt
        valid = ids >= 0
        n_tok = valid.sum(1)
        last = last_positions(value, ctx)
        j = torch.arange(ids.shape[1], device=value.device)
        # forced: the answer is the row's last n_tok tokens, token j predicted at position last - n_tok + j
        pred = (last[:, None] - n_tok[:, None] + j[None, :]) if self.forced else last[:, None].expand_as(ids)
        pred = pred.clamp(min=0)
        rows = torch.arange(value.shape[0], device=value.device)[:, None].expand_as(ids)
        lp = torch.log_softmax(value[rows, pred].float(), -1)
        tok = lp.gather(-1, ids.clamp(min=0)[..., None])[..., 0]
        out["values"] = (tok * valid).sum(1).detach().clone()

    def collect(self, raw, batch, vlm):
        rows = _per_row(vlm, self.answers, len(batch), "AnswerLogProb")
        return MetricResult(self.name, raw["values"], {"answer_ids": [tuple(r) for r in rows],
                                                       "n_tokens": [len(r) for r in rows]})


class LogitDiff(Probe):
    """``logit[a] - logit[b]`` at each row's last attended position (single-token answers; one pair for all rows or
    one per row)."""

    def __init__(self, a, b):
        self.a, self.b = a, b

    def sites(self, vlm):
        return ["unembed.hook_out"]

    def extras(self, vlm, batch):
        a = _single(vlm, self.a, len(batch), "LogitDiff")
        b = _single(vlm, self.b, len(batch), "LogitDiff")
        _check_vocab(vlm, torch.cat([a, b]), "LogitDiff")
        return {"a": a, "b": b}

    def check(self, vlm, batch):
        self.extras(vlm, batch)

    def at(self, site, value, ctx, out):
        logits = last_logits(value, ctx)
        n = value.shape[0]
        a, b = rows_for(ctx["mine"]["a"], n).to(value.device), rows_for(ctx["mine"]["b"], n).to(value.device)
        out["values"] = (logits.gather(1, a[:, None]) - logits.gather(1, b[:, None]))[:, 0].detach().clone()

    def collect(self, raw, batch, vlm):
        ex = self.extras(vlm, batch)
        return MetricResult(self.name, raw["values"], {"a": ex["a"].tolist(), "b": ex["b"].tolist()})


class ChoiceProb(Probe):
    """The probability of each option among ``options`` (single tokens, the same for every row): softmax over the
    options' logits at the last position (``values``, (batch, n_options)); ``vocab_prob``: under the whole
    vocabulary. Table: one row per (row, option) with ``answer`` (the option as given) and ``answer_id``."""

    def __init__(self, options):
        if not isinstance(options, (list, tuple)) or len(options) < 2:
            raise InputError(f"ChoiceProb: give a list of at least two options, got {options!r}")
        self.options = list(options)

    def sites(self, vlm):
        return ["unembed.hook_out"]

    def extras(self, vlm, batch):
        got = [_ids_of(vlm, o, "ChoiceProb") for o in self.options]
        bad = [(o, len(i)) for o, i in zip(self.options, got) if len(i) != 1]
        if bad:
            raise InputError(f"ChoiceProb: every option must be one token; {bad[0][0]!r} is {bad[0][1]} tokens: give "
                             f"its first token (or score it with AnswerLogProb(..., forced=True))")
        ids = torch.tensor([i[0] for i in got], dtype=torch.long)
        if len(set(ids.tolist())) != len(ids):
            raise InputError(f"ChoiceProb: options {self.options} map to repeated token ids {ids.tolist()}")
        _check_vocab(vlm, ids, "ChoiceProb")
        return {"ids": ids}

    def check(self, vlm, batch):
        self.extras(vlm, batch)

    def at(self, site, value, ctx, out):
        logits = last_logits(value, ctx)
        ids = ctx["mine"]["ids"].to(value.device)
        out["values"] = torch.softmax(logits[:, ids], -1).detach().clone()
        out["vocab_prob"] = torch.softmax(logits, -1)[:, ids].detach().clone()

    def collect(self, raw, batch, vlm):
        ids = self.extras(vlm, batch)["ids"].tolist()
        n = raw["values"].shape[0]
        res = MetricResult(self.name, raw["values"], {"answer": [str(o) for o in self.options] * n,
                                                     "answer_id": ids * n,
                                                     "vocab_prob": raw["vocab_prob"].reshape(-1).tolist()})
        res.vocab_prob = raw["vocab_prob"]
        return res


class KLToClean(Probe):
    """KL(p_clean || p_row) of the next-token distributions at the last position, where the clean run is a row of
    the SAME batch: ``clean=0`` (row 0 for every row) or one row index per row (its own index: KL 0)."""

    def __init__(self, clean=0):
        self.clean = clean

    def sites(self, vlm):
        return ["unembed.hook_out"]

    def extras(self, vlm, batch):
        n = len(batch)
        c = [self.clean] * n if isinstance(self.clean, int) and not isinstance(self.clean, bool) else self.clean
        if not isinstance(c, (list, tuple)) or len(c) != n or not all(
                isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n for i in c):
            raise InputError(f"KLToClean: clean={self.clean!r}: give the clean row's index (0..{n - 1}) for all "
                             f"rows, or one index per row ({n})")
        return {"clean": torch.tensor(c, dtype=torch.long)}

    def check(self, vlm, batch):
        self.extras(vlm, batch)

    def at(self, site, value, ctx, out):
        logp = torch.log_softmax(last_logits(value, ctx), -1)
        ref = logp[ctx["mine"]["clean"].to(value.device)]
        out["values"] = (ref.exp() * (ref - logp)).sum(-1).detach().clone()

    def collect(self, raw, batch, vlm):
        return MetricResult(self.name, raw["values"], {"clean_row": self.extras(vlm, batch)["clean"].tolist()})
