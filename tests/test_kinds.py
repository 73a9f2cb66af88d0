"""The ``kind`` column of every per-visual-token table, and aggregates over the kinds a researcher asked for.

On the two families whose image-token mask holds tokens with no image region (LLaVA-NeXT / OneVision's learned
newline tokens, and their base-image "thumbnail" tokens): every table's ``kind`` equals ``batch.kinds`` at the row's
visual index ("text" at a text position), and the means over visual tokens equal plain-torch means over the
tokens of the kinds asked for, computed from HF's own ``output_hidden_states`` (an independent forward).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mech_vtokens as mv
from mech_vtokens import testing as T
from mech_vtokens.errors import InputError
from mech_vtokens.results import REGION_KINDS

ANYRES = ["llava_next", "llava_onevision"]


def _inputs(fam):
    # a wide and a tall image: anyres tiles both, so each has patch, thumbnail and newline tokens
    return [T.image(112, 0).resize((168, 84)), T.image(96, 1).resize((84, 140))], [T.prompt(fam), T.prompt(fam)]


def _want_kind(batch, visual_index):
    kinds = batch.kinds
    return [kinds[v] if v >= 0 else "text" for v in visual_index]


@pytest.mark.parametrize("fam", ANYRES)
def test_every_token_table_has_the_batch_kind(tiny_vlm, fam):
    from mech_vtokens.probes import EmbedLens, LogitLens, NormTracker, SinkChannels, ViTSinks

    vlm = tiny_vlm(fam)
    ims, prs = _inputs(fam)
    batch = vlm.prepare(ims, prs)
    assert {"patch", "thumbnail", "newline"} <= set(batch.kinds)  # the fixture shows every kind it can
    sites = ["vision_projector.hook_out", "hook_embed", "blocks.0.hook_resid_post"]
    res = mv.run(vlm, ims, prs, probes=[EmbedLens(k=2, sites=sites), LogitLens(k=2, positions="all"),
                                        NormTracker(), SinkChannels(threshold=3.0), ViTSinks(threshold=1.0)])
    for name in ("embed_lens", "logit_lens", "norm_tracker", "sink_channels", "vit_sinks"):
        df = res[name].to_pandas()
        lm = df[df.tower == "lm"] if "tower" in df else df
        assert list(lm.kind) == _want_kind(batch, lm.visual_index.tolist()), name
        assert (lm.visual_index < 0).any() == (name in ("logit_lens", "norm_tracker", "sink_channels")), name
    nt = res["norm_tracker"].to_pandas()
    vis = nt[nt.tower == "vision"]
    assert list(vis.kind) == [batch.kinds[v] if v >= 0 else "unused" for v in vis.visual_index]
    assert "newline" not in set(vis.kind)  # a newline token has no vision row
    # the projector rows of the lens (visual tokens in order) carry their kinds too
    el = res["embed_lens"].to_pandas()
    proj = el[(el.site == "vision_projector.hook_out") & (el["rank"] == 0)]
    assert list(proj.kind) == batch.kinds


@pytest.mark.parametrize("fam", ANYRES)
def test_norm_means_over_the_kinds_asked_equal_plain_torch(tiny_vlm, fam):
    from mech_vtokens.probes import NormTracker

    vlm = tiny_vlm(fam)
    ims, prs = _inputs(fam)
    batch = vlm.prepare(ims, prs)
    nt = mv.run(vlm, ims, prs, probes=[NormTracker(vision=False)])["norm_tracker"]
    with torch.no_grad():
        hs = vlm.hf(**batch.inputs, output_hidden_states=True).hidden_states
    kinds = np.array(batch.kinds)
    vm = batch.visual_mask
    for want_kinds in [("patch",), ("newline",), ("patch", "thumbnail", "newline")]:
        g = nt.by_group(kinds=want_kinds)
        assert g.attrs["kinds"] == want_kinds
        of_kind = torch.as_tensor(np.isin(kinds, want_kinds))
        for site, h in (("hook_embed", hs[0]), ("blocks.0.hook_resid_post", hs[1])):
            ref = h[vm][of_kind].float().norm(dim=-1).mean()
            got = g[(g.site == site) & (g.group == "visual")].l2
            assert len(got) == 1
            torch.testing.assert_close(torch.tensor(float(got.iloc[0])), ref, atol=1e-4, rtol=1e-5,
                                       msg=(site, want_kinds))
            text = g[(g.site == site) & (g.group == "text")].l2.iloc[0]  # text rows whatever the kinds
            att = batch.inputs["attention_mask"].bool()
            torch.testing.assert_close(torch.tensor(float(text)), h[att & ~vm].float().norm(dim=-1).mean(),
                                       atol=1e-4, rtol=1e-5)
    # the default is the tokens that show the image, stated in the table
    default = nt.by_group()
    assert default.attrs["kinds"] == REGION_KINDS
    region = nt.by_group(kinds=REGION_KINDS)
    assert default.equals(region)
    every = nt.by_group(kinds=("patch", "thumbnail", "newline"))
    assert not np.allclose(default.l2, every.l2)  # the newline tokens would change the means
    with pytest.raises(InputError, match="kinds"):
        nt.by_group(kinds=("newlines",))
    with pytest.raises(InputError, match="kinds"):
        NormTracker(kinds="pach")


@pytest.mark.parametrize("fam", ANYRES)
def test_label_matching_and_sink_ranks_search_the_kinds_asked(tiny_vlm, fam):
    """A label found only at the newline tokens counts only when newline tokens are asked for."""
    from mech_vtokens.probes import EmbedLens, LabelMatching, SinkChannels

    vlm = tiny_vlm(fam)
    ims, prs = _inputs(fam)
    batch = vlm.prepare(ims, prs)
    res = mv.run(vlm, ims, prs, probes=[EmbedLens(k=3, sites=["hook_embed"]), SinkChannels(threshold=3.0)])
    el = res["embed_lens"]
    ids = el.ids["hook_embed"]
    kinds, img = np.array(batch.kinds), batch.tokens["image"].numpy()
    # a word among the top-3 of image 0's newline tokens; its hit by hand for each kind selection
    words = set(T.WORDS)
    nl = ids[torch.as_tensor((kinds == "newline") & (img == 0))].flatten().tolist()
    label = next(vlm.tokenizer.decode([i]) for i in nl if vlm.tokenizer.decode([i]) in words)
    lid = vlm.tokenizer.convert_tokens_to_ids(label)
    for want_kinds in [("newline",), ("patch",), REGION_KINDS]:
        lm = LabelMatching.score(el, [[label], [label]], vlm.tokenizer, batch, kinds=want_kinds)
        h = lm.hits()
        assert h.attrs["kinds"] == want_kinds
        for im in (0, 1):
            rows = torch.as_tensor(np.isin(kinds, want_kinds) & (img == im))
            assert bool(h[h.image == im].hit.iloc[0]) == bool((ids[rows] == lid).any()), (want_kinds, im)
    assert bool(LabelMatching.score(el, [[label], [label]], vlm.tokenizer, batch,
                                    kinds=("newline",)).hits().hit.iloc[0])
    # rank tracking ranks the tokens of the kinds asked only
    sc = res["sink_channels"]
    rt = sc.rank_tracking(kinds=("patch",))
    assert rt.attrs["kinds"] == ("patch",) and set(kinds[rt.visual_index]) == {"patch"}
    assert rt["rank"].max() <= int(((kinds == "patch") & (img == 0)).sum())


def test_partition_fractions_over_the_kinds_asked(tiny_vlm):
    from mech_vtokens.partition import calibrate

    fam = "llava_next"
    vlm = tiny_vlm(fam)
    ims, prs = _inputs(fam)
    batch = vlm.prepare(ims, prs)
    part = calibrate(vlm, ims, prs[0], vit_threshold=1.0, phi_threshold=3.0)
    res = part.classify(ims, prs[0])
    df = res.to_pandas()
    assert list(df.kind) == batch.kinds
    codes, kinds = res.codes, np.array(batch.kinds)
    from mech_vtokens.partition import GROUPS

    for want_kinds in [("patch",), ("newline",), REGION_KINDS]:
        of_kind = torch.as_tensor(np.isin(kinds, want_kinds))
        want = {g: float((codes[of_kind] == i).sum()) / int(of_kind.sum()) for i, g in enumerate(GROUPS)}
        assert res.fractions(kinds=want_kinds) == want
    assert res.fractions() == res.fractions(kinds=REGION_KINDS)
