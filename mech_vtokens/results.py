"""Result objects: small, reduced, with ``.to_pandas()`` in long format (named columns, one row per observation) and
``.plot()`` (a matplotlib Figure) where a picture helps; :class:`Results`, what ``mech_vtokens.run`` returns: every
component's result, keyed by the component's name and indexable by the component object itself."""

from __future__ import annotations

import difflib
from collections.abc import Mapping

from .errors import InputError


class Result:
    """Base result: ``to_pandas()`` builds a long-format DataFrame; ``plot(ax=None)`` draws it where a picture helps
    and returns the matplotlib Figure (never shown: the caller shows or saves it)."""

    name = "result"

    def to_pandas(self):
        raise NotImplementedError

    def plot(self, ax=None):
        raise InputError(f"{type(self).__name__} has no plot: its table is .to_pandas() (plot a column of it with "
                         f"pandas / matplotlib)")

    def __repr__(self) -> str:
        df = self.to_pandas()
        return f"{type(self).__name__}({len(df)} rows; columns: {', '.join(df.columns)})"

    def _repr_html_(self):  # notebooks: the table's head
        return self.to_pandas().head(20).to_html()


class InterventionResult(Result):
    """What an intervention returns from ``run``: which one ran, and, if it was asked with
    ``Intervention.report(...)``, what the forward produced under it (read inside the trace on the prompt's forward,
    with every intervention of the run applied): ``logits`` (batch, vocab) at each row's last attended position
    (``position``, in the forward's own coordinates: after a Prune, the shortened sequence) and, given
    ``answer_ids``, their ``logprob`` (batch, n_answers; log-softmax over the vocabulary, in float32). Without a
    report these are None and the forward did no extra work."""

    name = "intervention"

    def __init__(self, intervention, **facts):
        self.intervention = intervention
        self.facts = facts
        self.logits = self.logprob = self.position = self.answer_ids = None

    def with_report(self, raw, answer_ids):
        """This result with the report read in the trace (``raw``: the reporter's reduced tensors, on the CPU)."""
        self.logits, self.position = raw.get("logits"), raw.get("position")
        self.logprob = raw.get("logprob")
        self.answer_ids = answer_ids
        return self

    def to_pandas(self):
        import pandas as pd

        who = repr(self.intervention)
        if self.logits is None:
            return pd.DataFrame([{"intervention": who, **self.facts}])
        rows = []
        for r in range(self.logits.shape[0]):
            base = {"intervention": who, **self.facts, "row": r, "position": int(self.position[r])}
            if self.logprob is None:
                top = int(self.logits[r].argmax())
                rows.append({**base, "top_id": top, "top_logit": float(self.logits[r, top])})
                continue
            ids = self.answer_ids[r] if self.answer_ids.dim() == 2 else self.answer_ids
            for j, tok in enumerate(ids.tolist()):
                rows.append({**base, "answer_id": tok, "logit": float(self.logits[r, tok]),
                             "logprob": float(self.logprob[r, j])})
        return pd.DataFrame(rows)

    def plot(self, ax=None):
        """The answers' log-probs per row (a report with ``answer_ids``)."""
        if self.logprob is None:
            raise InputError(f"{type(self).__name__} of {self.intervention!r} has no plot: it plots the log-probs of "
                             f"answer ids; ask for them with {type(self.intervention).__name__}(...).report("
                             f"answer_ids=[...])")
        from .views.figure import figure_of, subplots

        if ax is None:
            _, ax = subplots(figsize=(5, 3))
        df = self.to_pandas()
        for tok, g in df.groupby("answer_id"):
            ax.plot(g["row"], g["logprob"], "o-", label=f"id {tok}")
        from matplotlib.ticker import MaxNLocator

        ax.set_xlabel("row")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("log-prob at the last position")
        ax.set_title(repr(self.intervention)[:60])
        ax.legend(fontsize=7)
        return figure_of(ax)


class ResultKeyError(KeyError):
    """A key that names no result of a :class:`Results` (its message, not its repr, is shown)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class Results(Mapping):
    """What ``mech_vtokens.run`` (and ``Experiment.results``, ``Generation.results``) returns: an ordered, read-only
    mapping from each component's name to its result, probes first then interventions, each in the order given.

    - keys: the component's ``name`` (``EmbedLens`` -> ``"embed_lens"``, ``Prune`` -> ``"prune"``; a component
      named with ``.named("early")`` uses that); a name given twice gets a suffix in list order: ``"embed_lens"``,
      ``"embed_lens_1"``, ...
    - ``res[lens]``: the result of the component object ``lens`` (what a user who built ``lens = EmbedLens(k=5)``
      holds); a component passed twice is ambiguous: use its keys.
    - ``res.to_pandas()``: the results' frames concatenated with a ``result`` column (the key) first, where they
      have the same columns (e.g. an EmbedLens and a LogitLens); otherwise an error that says to pick one.
    - a Mapping, so ``for key in res`` / ``a, b = res`` give the KEYS, never the results: index by name or object.
    """

    def __init__(self, pairs, order=None):
        self._results: dict = {}
        self._of: dict = {}  # id(component) -> its keys
        self._components = []  # kept alive, so their ids stay theirs
        for comp, res in pairs:
            key = self._free_key(str(getattr(comp, "name", None) or getattr(res, "name", "result")))
            self._results[key] = res
            self._of.setdefault(id(comp), []).append(key)
            self._components.append(comp)
        self._order = order  # the model's sites in forward order: the combined table's ``site`` column

    def _free_key(self, name):
        key, i = name, 0
        while key in self._results:
            i += 1
            key = f"{name}_{i}"
        return key

    def __getitem__(self, key):
        if isinstance(key, str):
            if key in self._results:
                return self._results[key]
            close = difflib.get_close_matches(key, list(self._results), n=1, cutoff=0.5)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ResultKeyError(f"no result named {key!r}; {hint}the keys are {list(self._results)}")
        keys = self._of.get(id(key))
        if keys and len(keys) == 1:
            return self._results[keys[0]]
        if keys:
            raise ResultKeyError(f"{key!r} was passed {len(keys)} times; its results are under the keys {keys}")
        if isinstance(key, int):
            first = next(iter(self), "name")
            raise ResultKeyError(f"results are keyed by component name, not position: use res[{first!r}] or "
                                 f"res[component]; the keys are {list(self._results)}")
        raise ResultKeyError(f"{key!r} is not a component of this run; the keys are {list(self._results)}")

    def __contains__(self, key):
        return key in self._results if isinstance(key, str) else id(key) in self._of

    def __iter__(self):
        return iter(self._results)

    def __len__(self) -> int:
        return len(self._results)

    def _rows(self):
        out = {}
        for k, r in self._results.items():
            try:
                out[k] = len(r.to_pandas())
            except Exception as err:  # noqa: BLE001  (a repr must not raise)
                out[k] = f"? ({type(err).__name__})"
        return out

    def to_pandas(self):
        """Every result's frame, concatenated, with a ``result`` column (its key) first; only results whose frames
        have the same columns (else an InputError naming them: pick one with ``res[key].to_pandas()``)."""
        import pandas as pd

        if not self._results:
            raise InputError("no results to concatenate")
        frames = {k: r.to_pandas() for k, r in self._results.items()}
        first, cols = next(iter(frames.items()))[0], list(next(iter(frames.values())).columns)
        for k, df in frames.items():
            if set(df.columns) != set(cols):
                raise InputError(f"the results {first!r} (columns {cols}) and {k!r} (columns {list(df.columns)}) "
                                 f"have different tables, so one frame of both would be mostly empty; pick one: "
                                 f"res[{k!r}].to_pandas()")
        df = pd.concat([f[cols].assign(result=k) for k, f in frames.items()], ignore_index=True)
        df["result"] = pd.Categorical(df["result"], categories=list(frames), ordered=True)
        if "site" in df and self._order is not None:
            from .site_names import site_column

            df["site"] = site_column(df["site"].astype(str), self._order)
        return df[["result"] + cols]

    def __repr__(self) -> str:
        rows = self._rows()
        body = ", ".join(f"{k!r}: {type(r).__name__} [{rows[k]} rows]" for k, r in self._results.items())
        return f"Results({{{body}}})"

    def _repr_html_(self):
        import html

        rows = self._rows()
        cells = "".join(f"<tr><td>{html.escape(k)}</td><td>{type(r).__name__}</td><td>{rows[k]}</td></tr>"
                        for k, r in self._results.items())
        return (f"<table><thead><tr><th>key</th><th>result</th><th>rows</th></tr></thead><tbody>{cells}</tbody>"
                f"</table>")


# The visual-token kinds that show a region of the image (``batch.kinds``): the default of every aggregate over
# visual tokens (means per layer, A(l), partition fractions). "newline" (LLaVA-NeXT / OneVision's learned row
# separators) and "cls" have no region and would skew them; pass ``kinds=`` to include them.
REGION_KINDS = ("patch", "thumbnail")


def check_kinds(kinds, who: str) -> tuple:
    """``kinds`` (one name or several) as a tuple of ``batch.kinds`` names, or an InputError naming them."""
    from .adapters.geometry import KINDS
    from .errors import InputError

    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        raise InputError(f"{who}: kinds={kinds!r}; name one or more visual-token kinds of {KINDS} (default "
                         f"{REGION_KINDS}: the tokens that show the image)")
    return kinds


def kind_names(batch, visual_index) -> list:
    """The ``kind`` column: ``batch.kinds`` of each visual index, "text" where the index is -1 (a text position)."""
    kinds = batch.kinds
    return [kinds[int(v)] if v >= 0 else "text" for v in visual_index]


def visual_index_frame(batch):
    """Columns identifying each visual token of a batch, in ``batch.visual_positions`` order (``kind``: its
    ``batch.kinds`` entry)."""
    import pandas as pd

    pos = batch.visual_positions
    t = batch.tokens
    return pd.DataFrame({
        "row": pos[:, 0].numpy(), "position": pos[:, 1].numpy(), "visual_index": range(len(pos)),
        "kind": batch.kinds, "image": t["image"].numpy(), "tile": t["tile"].numpy(), "grid_row": t["row"].numpy(),
        "grid_col": t["col"].numpy()})


def token_frame(batch, selection):
    """Identity columns (row, image, position, visual_index, kind) of the positions ``selection`` (batch, seq) bool
    picks, in ``selection.nonzero()`` order; text positions get image = visual_index = -1 and kind "text"."""
    import pandas as pd
    import torch

    pos = selection.nonzero()
    vm = batch.visual_mask
    vindex = torch.full(vm.shape, -1, dtype=torch.long)
    vindex[vm] = torch.arange(int(vm.sum()))
    vi = vindex[pos[:, 0], pos[:, 1]]
    img = torch.full_like(vi, -1)
    if int(vm.sum()):
        img[vi >= 0] = batch.tokens["image"][vi[vi >= 0]]
    return pd.DataFrame({"row": pos[:, 0].numpy(), "image": img.numpy(), "position": pos[:, 1].numpy(),
                         "visual_index": vi.numpy(), "kind": kind_names(batch, vi.tolist())})
