"""Label–token matching A(ℓ) (paper Sec. 3.2, eq. 2, Fig. 3) for EmbedLens and LogitLens side by side.

For each object label t* of an image: is t* among the top-k tokens (k = 5 in the paper) of ANY visual token of that
image at layer ℓ? A(ℓ) = the fraction of (image, label) pairs for which it is. Computed for both lenses at the same
sites (default ``hook_embed`` = layer -1 and ``blocks.{i}.hook_resid_post``), in the one forward.

How a label becomes token ids (``rule``); each label is tried as written and with a leading space (the word-start
form: "▁cat" in SentencePiece, "Ġcat" in byte-level BPE); unknown / special tokens are dropped:

- ``"whole_word"`` (default): the label must BE a token: the variants that encode to exactly one token; a match is
  any of those ids in the top-k. Labels with no single-token form raise an InputError before the forward (use
  ``"first"`` or ``"all"`` for them). This is eq. 2 read literally (t* is a token).
- ``"first"``: the first sub-token of each variant ("giraffe" -> "▁gir").
- ``"all"``: every sub-token of one variant must appear in the top-k of some visual token of the image (not
  necessarily the same one).

``LabelMatching.score(embed_result, labels, tokenizer, batch)`` computes A(ℓ) from lens results you already have.

Kinds: "any visual token" means any of ``kinds`` (``batch.kinds``), by default ``results.REGION_KINDS`` ("patch",
"thumbnail"): LLaVA-NeXT / OneVision's learned newline tokens show no image region, so a label found only there is
not grounded in the image; pass ``kinds=("patch", "thumbnail", "newline")`` to count them. The tables'
``attrs["kinds"]`` say which.
"""

from __future__ import annotations

import torch

from mech_vtokens.component import Probe
from mech_vtokens.errors import InputError
from mech_vtokens.results import REGION_KINDS, Result, check_kinds

from .embed_lens import EmbedLens
from .logit_lens import LogitLens

RULES = ("whole_word", "first", "all")


def label_token_ids(tokenizer, label: str, rule: str = "whole_word") -> list[list[int]]:
    """The id lists a label may match: one list per accepted variant (see the module docstring)."""
    if rule not in RULES:
        raise InputError(f"rule={rule!r}: choose one of {RULES}")
    bad = set(int(i) for i in tokenizer.all_special_ids)
    if tokenizer.unk_token_id is not None:
        bad.add(int(tokenizer.unk_token_id))
    out = []
    for text in dict.fromkeys([label, " " + label, label.lower(), " " + label.lower()]):
        ids = [int(i) for i in tokenizer.encode(text, add_special_tokens=False)]
        ids = [i for i in ids if i not in bad and tokenizer.decode([i]).strip()]
        if not ids:
            continue
        if rule == "whole_word":
            if len(ids) == 1:
                out.append(ids)
        elif rule == "first":
            out.append(ids[:1])
        else:
            out.append(ids)
    uniq = []
    for ids in out:
        if ids not in uniq:
            uniq.append(ids)
    return uniq


def _labels_ids(tokenizer, labels, rule, n_images):
    if isinstance(labels, str) or len(labels) != n_images:
        raise InputError(f"labels: give one list of label strings per image ({n_images} image(s) in the batch, in "
                         f"processor order), e.g. [['cat', 'dog'], ['car']]")
    table = []
    for im, labs in enumerate(labels):
        if isinstance(labs, str):
            labs = [labs]
        row = []
        for lab in labs:
            ids = label_token_ids(tokenizer, str(lab), rule)
            if not ids:
                hint = ("it is not a single token: use rule='first' or rule='all'" if rule == "whole_word"
                        else "it tokenizes to nothing but unknown/special tokens: check the spelling")
                raise InputError(f"label {lab!r} of image {im}: {hint}")
            row.append((str(lab), ids))
        table.append(row)
    return table


def _hits(result, table, k=None, kinds=REGION_KINDS):
    """(image, label, site) -> hit, from a LensResult (visual rows of ``kinds`` only)."""
    recs = []
    for site, ids in result.ids.items():
        frame = result._frames["projector" if site == "vision_projector.hook_out" else "lm"]
        if k is not None:
            ids = ids[:, :k]
        vi = frame.visual_index.to_numpy()
        img = frame.image.to_numpy()
        of_kind = frame.kind.isin(kinds).to_numpy()
        for im, labs in enumerate(table):
            rows = torch.as_tensor(((vi >= 0) & (img == im) & of_kind).nonzero()[0])
            found = set(ids[rows].flatten().tolist())
            for lab, variants in labs:
                hit = any(all(i in found for i in var) for var in variants)
                recs.append({"image": im, "label": lab, "site": site, "hit": hit})
    return recs


class LabelMatching(Probe):
    """A(ℓ) of eq. 2 (paper Sec. 3.2, Fig. 3) for EmbedLens and LogitLens, in one forward.

    ``LabelMatching(labels, k=5, rule="whole_word", sites=None, lenses=("EmbedLens", "LogitLens"),
    skip_special=False, layers="blocks")``; ``labels``: one list of label strings per image of the batch
    (processor order). ``layers="hidden_states"``: the paper authors' convention (the index into HF
    ``output_hidden_states``, 0 = the LM input, the last entry after the final norm; the table's column is then
    ``hidden_state``) instead of the library's (``layer``: the output of block i, -1 = the LM input, the last block
    read before the final norm); see ``probes/lens.py``.
    """

    def __init__(self, labels, k: int = 5, rule: str = "whole_word", sites=None,
                 lenses=("EmbedLens", "LogitLens"), skip_special: bool = False, layers: str = "blocks",
                 kinds=REGION_KINDS):
        if rule not in RULES:
            raise InputError(f"rule={rule!r}: choose one of {RULES}")
        known = {"EmbedLens": EmbedLens, "LogitLens": LogitLens}
        lenses = [lenses] if isinstance(lenses, str) else list(lenses)
        if not lenses or any(lens not in known for lens in lenses):
            raise InputError(f"lenses={lenses!r}: choose from {tuple(known)}")
        self.labels, self.k, self.rule, self.lens_names = labels, k, rule, lenses
        self.layers, self.kinds = layers, check_kinds(kinds, "LabelMatching")
        self._lenses = [known[n](k=k, sites=sites, skip_special=skip_special, layers=layers) for n in lenses]

    def sites(self, vlm):
        out = []
        for lens in self._lenses:
            out += [s for s in lens.sites(vlm) if s not in out]
        return out

    def check(self, vlm, batch):
        for lens in self._lenses:
            lens.check(vlm, batch)
        _labels_ids(vlm.tokenizer, self.labels, self.rule, len(batch.image_sizes))

    def extras(self, vlm, batch):
        return {"lenses": [lens.extras(vlm, batch) for lens in self._lenses]}

    def at(self, site, value, ctx, out):
        mine = ctx["mine"]
        try:
            for j, lens in enumerate(self._lenses):
                ctx["mine"] = mine["lenses"][j]
                lens.at(site, value, ctx, out.setdefault(j, {}))
        finally:
            ctx["mine"] = mine

    def collect(self, raw, batch, vlm):
        table = _labels_ids(vlm.tokenizer, self.labels, self.rule, len(batch.image_sizes))
        results = [lens.collect(raw[j], batch, vlm) for j, lens in enumerate(self._lenses)]
        return LabelMatchingResult(self._records(results, table, kinds=self.kinds), vlm.n_layers, results,
                                   self.kinds)

    def record_rows(self, result):  # to_pandas() aggregates over images; the store keeps each image's hits
        return result.hits()

    @staticmethod
    def _records(results, table, k=None, kinds=REGION_KINDS):
        recs = []
        for res in results:
            for r in _hits(res, table, k, kinds):
                r["lens"] = res.lens
                recs.append(r)
        return recs

    @staticmethod
    def score(lens_results, labels, tokenizer, batch, rule: str = "whole_word", k: int | None = None,
              kinds=REGION_KINDS):
        """A(ℓ) from existing EmbedLens / LogitLens results (no forward); ``k`` may be smaller than theirs."""
        if not isinstance(lens_results, (list, tuple)):
            lens_results = [lens_results]
        kinds = check_kinds(kinds, "LabelMatching.score")
        table = _labels_ids(tokenizer, labels, rule, len(batch.image_sizes))
        return LabelMatchingResult(LabelMatching._records(lens_results, table, k, kinds),
                                   lens_results[-1]._n_layers, list(lens_results), kinds)


class LabelMatchingResult(Result):
    """``to_pandas()``: lens, site, layer, accuracy (A(ℓ)), n_labels. ``hits()``: one row per (lens, site, image,
    label). ``lenses``: the underlying LensResults (their top-k tables). ``kinds``: the visual-token kinds a label
    was searched among (also ``attrs["kinds"]`` of both tables)."""

    name = "label_matching"

    def __init__(self, records, n_layers, lenses, kinds=REGION_KINDS):
        self._records, self._n_layers, self.lenses, self.kinds = records, n_layers, lenses, tuple(kinds)

    def hits(self):
        import pandas as pd

        from mech_vtokens.site_names import site_column

        df = pd.DataFrame(self._records)
        of = {res.lens: res for res in self.lenses}
        col = self.layer_column
        df.insert(2, col, [of[lens].layer_of(s) for lens, s in zip(df.lens, df.site)])
        df["site"] = site_column(df["site"], self.lenses[0]._order)
        df = df[["lens", "site", col, "image", "label", "hit"]]
        df.attrs["layers"], df.attrs["kinds"] = self.layers, self.kinds
        return df

    @property
    def layers(self) -> str:
        """The layer convention of the table: ``"blocks"`` (column ``layer``) or ``"hidden_states"`` (column
        ``hidden_state``), that of the lens results it was scored from."""
        conv = {res.layers for res in self.lenses}
        if len(conv) > 1:
            raise InputError(f"LabelMatching: lens results in both layer conventions {sorted(conv)}; score results "
                             f"of one convention (layers='blocks' or 'hidden_states') together")
        return conv.pop()

    @property
    def layer_column(self) -> str:
        return self.lenses[0].layer_column if self.layers == "hidden_states" else "layer"

    def to_pandas(self):
        h = self.hits()
        col = self.layer_column
        g = h.groupby(["lens", "site", col], sort=False).hit
        df = g.mean().rename("accuracy").to_frame().join(g.size().rename("n_labels")).reset_index()
        df.attrs["layers"], df.attrs["kinds"] = self.layers, self.kinds
        return df

    def plot(self, ax=None):
        """Fig. 3: A(ℓ) per layer for each lens."""
        from mech_vtokens.views.figure import figure_of, integer_layers, subplots

        df = self.to_pandas()
        if ax is None:
            _, ax = subplots(figsize=(6, 4))
        for lens, d in df.groupby("lens", sort=False):
            ax.plot(d[self.layer_column], d.accuracy, marker="o", label=lens)
        ax.set_xlabel("layer (-1 = LM input; the output of block i)" if self.layers == "blocks" else
                      "output_hidden_states index (0 = LM input; the last after the final norm)")
        ax.set_ylabel("label-token matching A(ℓ)")
        integer_layers(ax)
        ax.legend()
        return figure_of(ax)
