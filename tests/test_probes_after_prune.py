"""Probes behind a Prune (a shorter sequence): one forward, same rows at every site, removed tokens NaN / id -1,
kept tokens equal to a reference computed on the pruned model's own hidden states."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mech_vtokens as mv
from mech_vtokens import testing as T
from mech_vtokens.interventions import Positions, Prune, applied
from mech_vtokens.probes import EmbedLens, LogitLens, NormTracker, SinkChannels


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_lenses_norms_sinks_after_prune(tiny_vlm, family):
    vlm = tiny_vlm(family)
    imgs = [T.image(112, seed=1), T.image(112, seed=2)]
    prompts = [T.prompt(family), T.prompt(family, "how many objects are there ?")]
    batch = vlm.prepare(imgs, prompts)
    pruned = [0, 3, 4, 9, batch.n_visual - 1]  # visual indices (both images)
    prune = Prune(Positions(pruned))
    probes = [EmbedLens(k=3), LogitLens(k=3), NormTracker(vision=False), SinkChannels(dims=[1, 2])]
    res = mv.run(vlm, imgs, prompts, probes=probes, interventions=[prune])
    lens, logit, norms, sinks = (res[p] for p in probes)
    clean_lens = mv.run(vlm, imgs, prompts, probes=[EmbedLens(k=3)])["embed_lens"]

    # hook_embed is read before the prune: identical to a clean run
    assert torch.equal(lens.ids["hook_embed"], clean_lens.ids["hook_embed"])
    # reference: the pruned model's own hidden states (plain hooks), cosine top-k on its kept visual rows
    with applied(vlm, batch, interventions=[Prune(Positions(pruned))]), torch.no_grad():
        out = vlm.hf(**batch.inputs, output_hidden_states=True)
    keep = torch.ones(batch.n_visual, dtype=torch.bool)
    keep[pruned] = False
    W = vlm.embedding_matrix.detach().float()
    site = "blocks.0.hook_resid_post"
    short_visual = out.hidden_states[1]  # output of layer 0, shortened sequence
    vm = batch.visual_mask
    n_keep_rows = vm.sum(1) - torch.bincount(batch.visual_positions[~keep][:, 0], minlength=len(vm))
    rows = []
    for r in range(len(vm)):  # left-padded shortened layout: the kept visual tokens are the last ones' visual slots
        width = short_visual.shape[1]
        ids_r = batch.inputs["input_ids"][r][batch.inputs["attention_mask"][r].bool()]
        keep_pos = torch.ones(len(ids_r), dtype=torch.bool)
        vis_r = (ids_r == vlm.adapter.image_token_id).nonzero()[:, 0]
        first = int(vm[:r].sum())
        keep_pos[vis_r[~keep[first:first + len(vis_r)]]] = False
        kept_ids = ids_r[keep_pos]
        h = short_visual[r, width - len(kept_ids):][kept_ids == vlm.adapter.image_token_id]
        rows.append(h)
        assert len(h) == int(n_keep_rows[r])
    h = torch.cat(rows).float()
    ref = (F.normalize(h, dim=-1) @ F.normalize(W, dim=-1).T).topk(3, dim=-1).indices
    got = lens.ids[site]
    assert bool((got[~keep] == -1).all()) and bool(torch.isnan(lens.scores[site][~keep]).all())
    assert torch.equal(got[keep].long(), ref)
    assert bool((logit.ids[site][~keep] == -1).all()) and bool((logit.ids[site][keep] >= 0).all())

    df = lens.to_pandas()
    removed = df[(df.site == site) & df.visual_index.isin(pruned)]
    assert len(removed) == len(pruned) * 3 and removed.token.isna().all()
    nd = norms.to_pandas()
    at = nd[(nd.site == site) & (nd.visual_index >= 0)].sort_values("visual_index")
    assert np.isnan(at.l2.to_numpy()[pruned]).all() and not np.isnan(at.l2.to_numpy()[keep.numpy()]).any()
    kept_l2 = at.l2.to_numpy()[keep.numpy()]
    assert np.allclose(kept_l2, h.norm(dim=-1).numpy(), atol=1e-5)
    sd = sinks.to_pandas()
    s_at = sd[(sd.site == site) & (sd.visual_index >= 0)].sort_values("visual_index")
    assert np.isnan(s_at.phi.to_numpy()[pruned]).all() and not s_at.sink.to_numpy()[pruned].any()
