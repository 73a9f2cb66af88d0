"""Probes against independent computations: plain torch on HF ``output_hidden_states`` / torch forward hooks,
planted truths, composition (one forward, any order, remote="local"), and bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mech_vtokens as mv
from mech_vtokens import testing as T
from mech_vtokens.errors import InputError
from mech_vtokens.probes import EmbedLens, LogitLens
from mech_vtokens.ops import topk_rerank

import families as FM

FAMILIES = T.FAMILIES
ATOL = 1e-5


def _inputs(fam, vlm=None):
    return ([T.image(112, 0), T.image(96, 1)],
            [FM.prompt(vlm, fam), FM.prompt(vlm, fam, "is there a red circle on the left ?")])


def _reference_states(vlm, batch):
    """Per LM site (hook_embed, blocks.i.hook_resid_post): the full (batch, seq, d) hidden state, from HF
    ``output_hidden_states`` (index 0 = the LM input, i + 1 = after block i) except the last block, whose
    ``hidden_states`` entry is the final-NORMED state in transformers 5: that one comes from a torch forward hook."""
    from mech_vtokens.adapters.base import _resolve

    layers = _resolve(vlm.hf, vlm.adapter.decoder_layers)
    got = {}
    hook = layers[-1].register_forward_hook(lambda m, i, o: got.__setitem__("last",
                                                                         o[0] if isinstance(o, tuple) else o))
    try:
        with torch.no_grad():
            out = vlm.hf(**batch.inputs, output_hidden_states=True)
    finally:
        hook.remove()
    hs = out.hidden_states
    n = vlm.n_layers
    states = {"hook_embed": hs[0]}
    for i in range(n - 1):
        states[f"blocks.{i}.hook_resid_post"] = hs[i + 1]
    states[f"blocks.{n - 1}.hook_resid_post"] = got["last"]
    return states, out.logits


@pytest.fixture(scope="module")
def lens_runs(tiny_vlm):
    cache = {}

    def get(fam):
        if fam not in cache:
            vlm = tiny_vlm(fam)
            ims, prs = _inputs(fam, vlm)
            batch = vlm.prepare(ims, prs)
            res = mv.run(vlm, ims, prs, probes=[EmbedLens(k=4), LogitLens(k=4)])
            el, ll = res["embed_lens"], res["logit_lens"]
            cache[fam] = (vlm, batch, el, ll, *_reference_states(vlm, batch))
        return cache[fam]

    return get


# Real fixtures: the Qwen ones only. On the bf16 InternVL / fp16 LLaVA fixtures every hook_embed row falls back to the
# exact full-vocabulary search (near-ties at the real vocab size): 200+ s (InternVL) / 45 s (LLaVA) on 2 cores.
LENS_CASES = FAMILIES + tuple(ck for ck in FM.ONE_REAL if ck.startswith("Qwen/"))


@pytest.mark.parametrize("fam", LENS_CASES)
def test_embed_lens_equals_plain_torch(lens_runs, fam):
    vlm, batch, el, _, states, _ = lens_runs(fam)
    W = vlm.hf.get_input_embeddings().weight.float()[:len(vlm.tokenizer)]  # rows no token maps to are left out
    assert set(el.ids) == set(states)
    for site, h in states.items():
        h = h[batch.visual_mask].float()
        cos = F.normalize(h, dim=1) @ F.normalize(W, dim=1).T
        v, i = cos.topk(4, dim=1)
        assert torch.equal(el.ids[site], i), site
        torch.testing.assert_close(el.scores[site], v, atol=ATOL, rtol=0)
    df = el.to_pandas()
    assert list(df.columns[:11]) == ["row", "image", "site", "layer", "position", "visual_index", "kind", "rank",
                                     "token_id", "token", "score"]
    assert len(df) == len(states) * batch.n_visual * 4
    assert sorted(df.layer.unique()) == list(range(-1, vlm.n_layers))
    first = df[(df.site == "hook_embed") & (df["rank"] == 0)]
    assert (first.token == [vlm.tokenizer.decode([i]) for i in first.token_id]).all()
    assert (first.visual_index.to_numpy() == range(batch.n_visual)).all()
    assert (first.image.to_numpy() == batch.tokens["image"].numpy()).all()


@pytest.mark.parametrize("fam", LENS_CASES)
def test_logit_lens_equals_lm_head_of_norm(lens_runs, fam):
    vlm, batch, _, ll, states, logits = lens_runs(fam)
    n_tok = len(vlm.tokenizer)  # rows no token maps to are left out
    W = vlm.hf.get_output_embeddings().weight[:n_tok].float()
    logits = logits[..., :n_tok]
    for site, h in states.items():
        with torch.no_grad():  # fp32 product of the model-dtype normed state (bf16 logits tie too often)
            ref = vlm.final_norm(h[batch.visual_mask]).float() @ W.T
        if vlm.family == "gemma4":  # Gemma 4 caps its logits after lm_head: c * tanh(logits / c)
            cap = vlm.hf.config.get_text_config().final_logit_softcapping
            ref = torch.tanh(ref / cap) * cap
        v, i = ref.topk(4, dim=1)
        assert torch.equal(ll.ids[site], i), site
        torch.testing.assert_close(ll.scores[site], v, atol=ATOL, rtol=0)
    # the last layer's lens is the model's own prediction
    last = f"blocks.{vlm.n_layers - 1}.hook_resid_post"
    low = logits.dtype != torch.float32  # the model's own bf16 / fp16 logits: within their rounding
    torch.testing.assert_close(ll.scores[last][:, 0], logits[batch.visual_mask].max(-1).values.float(), atol=ATOL,
                               rtol=2 * torch.finfo(logits.dtype).eps if low else 0)


def test_lens_sites_positions_and_ad_hoc_norm_does_not_collide(tiny_vlm):
    """Any LM site; text positions; the projector site; and LogitLens's ad-hoc final-norm call leaves the real
    ``ln_final.hook_normalized`` read in the same forward intact."""
    from mech_vtokens.probes import Activations

    vlm = tiny_vlm("llava")
    ims, prs = _inputs("llava")
    sites = ["vision_projector.hook_out", "hook_embed", "blocks.0.hook_attn_out", "blocks.-1.hook_mlp_out"]
    res = mv.run(vlm, ims, prs, probes=[
        EmbedLens(k=3, sites=sites), LogitLens(k=3, sites=sites), Activations(["ln_final.hook_normalized",
                                                                              "blocks.0.hook_attn_out"]),
        EmbedLens(k=3, sites=["hook_embed"], positions="text")])
    el, ll, act, el_text = res["embed_lens"], res["logit_lens"], res["activations"], res["embed_lens_1"]
    batch = vlm.prepare(ims, prs)
    states, logits = _reference_states(vlm, batch)
    with torch.no_grad():
        assert torch.allclose(act["ln_final.hook_normalized"], vlm.final_norm(states["blocks.2.hook_resid_post"]),
                              atol=ATOL)
    # projector output == LM input at the visual positions (LLaVA), so the two sites agree
    assert torch.equal(el.ids["vision_projector.hook_out"], el.ids["hook_embed"])
    h = act["blocks.0.hook_attn_out"][batch.visual_mask]
    W = vlm.embedding_matrix.float()
    ref = (F.normalize(h, dim=1) @ F.normalize(W, dim=1).T).topk(3, dim=1)
    assert torch.equal(el.ids["blocks.0.hook_attn_out"], ref.indices)
    text = batch.inputs["attention_mask"].bool() & ~batch.visual_mask
    ht = states["hook_embed"][text]
    ref = (F.normalize(ht, dim=1) @ F.normalize(W, dim=1).T).topk(3, dim=1)
    assert torch.equal(el_text.ids["hook_embed"], ref.indices)
    df = el_text.to_pandas()
    assert (df.visual_index == -1).all() and (df.image == -1).all()
    # text tokens at the input are their own embeddings: top-1 is the token itself
    assert torch.equal(el_text.ids["hook_embed"][:, 0], batch.inputs["input_ids"][text])
    assert set(ll.to_pandas().layer) == {-1, 0, 2}


def test_skip_special_leaves_special_tokens_out(tiny_vlm):
    vlm = tiny_vlm("qwen2_5_vl")
    ims, prs = _inputs("qwen2_5_vl")
    el = mv.run(vlm, ims, prs, probes=[EmbedLens(k=10, sites=["hook_embed"], skip_special=True)])["embed_lens"]
    special = set(vlm.tokenizer.all_special_ids)
    assert special and not special & set(el.ids["hook_embed"].flatten().tolist())
    assert el.ids["hook_embed"].shape[1] == 10


def test_rerank_ids_equal_fp32_for_bf16_inputs():
    """The bf16 pass + fp32 re-rank gives the fp32 top-k ids, including planted near-ties that bf16 alone flips
    and tokens whose margin forces the full fp32 fallback."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(3000, 64, generator=g).to(torch.bfloat16)
    h = torch.randn(40, 64, generator=g).to(torch.bfloat16)
    # near-ties: rows 0..9 get two embedding rows that differ by one bf16 ulp in one coordinate
    for r in range(10):
        W[100 + r] = h[r] * 3
        W[200 + r] = W[100 + r]
        W[200 + r, 0] = (W[100 + r, 0].float() * (1 + 2 ** -7)).to(torch.bfloat16)
    inv = 1.0 / torch.linalg.vector_norm(W, dim=1, dtype=torch.float32)
    ref = (h.float() @ W.float().T * inv).topk(5, dim=1)
    fallbacks = 0
    for n_cand, chunk in [(16, 512), (5, 700), (6, 3000), (40, 3000)]:
        v, i, nf = topk_rerank(h, W, 5, n_cand, chunk, row_scale=inv)
        assert torch.equal(i, ref.indices), (n_cand, chunk)
        torch.testing.assert_close(v, ref.values, atol=1e-5, rtol=0)
        fallbacks += nf
    assert fallbacks > 0  # the full-vocabulary fp32 path ran and was right too


def _llava_with_planted_tokens(path, targets: dict, default: int):
    """A tiny LLaVA whose projector output at visual token j is EXACTLY the input embedding of ``targets[j]``
    (``default`` elsewhere), whatever the image: patch conv and CLS zeroed, vision layers made the identity, the
    position embedding of patch j set to a pattern (e_{2m} - e_{2m+1}) that the pre-LN maps to 4(e_{2m} - e_{2m+1}),
    and the projector picks that pattern's coordinate and writes the embedding row."""
    model, proc = T.build("llava")
    v = model.model.vision_tower
    with torch.no_grad():
        v.embeddings.patch_embedding.weight.zero_()
        v.embeddings.class_embedding.zero_()
        for layer in v.encoder.layers:
            for lin in (layer.self_attn.out_proj, layer.mlp.fc2):
                lin.weight.zero_()
                lin.bias.zero_()
        v.pre_layrnorm.weight.fill_(1.0)
        v.pre_layrnorm.bias.zero_()
        pos = v.embeddings.position_embedding.weight
        pos.zero_()
        d_v = pos.shape[1]
        slots = {}
        for j in range(pos.shape[0] - 1):
            m = list(targets).index(j) if j in targets else (d_v // 2 - 1)
            pos[1 + j, 2 * m], pos[1 + j, 2 * m + 1] = 1.0, -1.0
            slots[m] = targets.get(j, default)
        proj = model.model.multi_modal_projector
        proj.linear_1.weight.zero_()
        proj.linear_1.bias.zero_()
        proj.linear_1.weight[:d_v, :d_v] = torch.eye(d_v)
        g4 = F.gelu(torch.tensor(4.0)).item()
        E = model.get_input_embeddings().weight
        proj.linear_2.weight.zero_()
        proj.linear_2.bias.zero_()
        for m, tok in slots.items():
            proj.linear_2.weight[:, 2 * m] = E[tok] / g4
            proj.linear_2.weight[:, 2 * m + 1] = 0.0
    return T._save(model, proc, path)


def test_planted_visual_tokens_are_found_by_embed_lens(tmp_path):
    tok = T.build("llava")[1].tokenizer
    words = ["cat", "dog", "red", "circle", "tree", "sky"]
    ids = tok.convert_tokens_to_ids(words)
    targets = dict(zip([0, 7, 14, 20, 29, 35], ids))
    default = tok.convert_tokens_to_ids("the")
    vlm = mv.load(_llava_with_planted_tokens(tmp_path / "planted", targets, default))
    ims, prs = [T.image(84, 3)], [T.prompt("llava")]
    el = mv.run(vlm, ims, prs, probes=[EmbedLens(k=3, sites=["vision_projector.hook_out", "hook_embed"])])["embed_lens"]
    top1 = el.ids["hook_embed"][:, 0]
    for j, t in targets.items():
        assert int(top1[j]) == t
        assert el.scores["hook_embed"][j, 0] == pytest.approx(1.0, abs=1e-4)
    others = [j for j in range(len(top1)) if j not in targets]
    assert (top1[others] == default).all()
    df = el.to_pandas()
    hit = df[(df.site == "hook_embed") & (df["rank"] == 0) & (df.visual_index == 7)]
    assert hit.token.item() == "dog"


@pytest.mark.parametrize("make, fix", [
    (lambda: EmbedLens(k=0), "positive integer"),
    (lambda: LogitLens(k=-2), "positive integer"),
    (lambda: EmbedLens(k=3, positions="nowhere"), "positions"),
])
def test_bad_lens_arguments(make, fix):
    with pytest.raises(InputError, match=fix):
        make()


def test_bad_lens_input_before_the_forward(tiny_vlm):
    vlm = tiny_vlm("llava")
    ims, prs = _inputs("llava")
    vocab = vlm.embedding_matrix.shape[0]
    cases = [
        (EmbedLens(k=vocab + 1), "exceeds the vocabulary"),
        (EmbedLens(sites=["blocks.1.hook_nothing"]), "no hook"),
        (EmbedLens(sites=["blocks.9.hook_resid_post"]), "out of range"),
        (LogitLens(sites=["vision.blocks.0.hook_resid_post"]), "LM sites only"),
        (LogitLens(sites=["ln_final.hook_normalized"]), "final norm"),
        (EmbedLens(sites=["nowhere"]), "unknown site"),
    ]
    for probe, msg in cases:
        with pytest.raises(InputError, match=msg):
            mv.run(vlm, ims, prs, probes=[probe])
    with pytest.raises(InputError, match="has none"):
        mv.run(vlm, None, ["USER : what color is it ? ASSISTANT :"], probes=[EmbedLens()])


# ------------------------------------------------------------------------------------------------------------------
# φ, norms, BOS cosine, ViT sinks: hand computations on states caught with plain torch hooks.
# ------------------------------------------------------------------------------------------------------------------

def _hooked_states(vlm, batch):
    """Plain-torch forward hooks: every vision block output (flattened), LM input, resid_mid and resid_post."""
    from mech_vtokens.adapters.base import _resolve

    a, hf = vlm.adapter, vlm.hf
    got, hooks = {}, []

    def keep(name, idx=None):
        def f(m, i, o):
            o = o if idx is None or not isinstance(o, tuple) else o[idx]
            got[name] = (o[0] if isinstance(o, tuple) else o).detach().clone()
        return f

    for i, layer in enumerate(_resolve(hf, a.vision_layers)):
        hooks.append(layer.register_forward_hook(keep(f"vision.blocks.{i}.hook_resid_post",
                                                      a.vision_layer_output_index)))
    hooks.append(_resolve(hf, a.language_model).register_forward_pre_hook(
        lambda m, args, kw: got.__setitem__("hook_embed", kw["inputs_embeds"].detach().clone()), with_kwargs=True))
    def injected(m, args, kw):  # what the LM adds between layers (Qwen3-VL DeepStack), scattered
        for i, rows in enumerate(kw.get("deepstack_visual_embeds") or []):
            full = torch.zeros_like(kw["inputs_embeds"])
            full[kw["visual_pos_masks"]] = rows.to(full.dtype)
            got[f"blocks.{i}.hook_deepstack"] = full

    hooks.append(_resolve(hf, a.language_model).register_forward_pre_hook(injected, with_kwargs=True))
    for i, layer in enumerate(_resolve(hf, a.decoder_layers)):
        hooks.append(layer.register_forward_hook(keep(f"blocks.{i}.hook_resid_post")))
        hooks.append(_resolve(layer, a.ln2).register_forward_pre_hook(
            lambda m, args, i=i: got.__setitem__(f"blocks.{i}.hook_resid_mid", args[0].detach().clone())))
    try:
        with torch.no_grad():
            hf(**batch.inputs)
    finally:
        for h in hooks:
            h.remove()
    return got


@pytest.mark.parametrize("fam", FM.FAMILIES_AND_ONE_REAL)
def test_phi_norms_cosines_vit_norms_equal_hand_computation(tiny_vlm, fam):
    from mech_vtokens.probes import NormTracker, SinkChannels, ViTSinks

    vlm = tiny_vlm(fam)
    ims, prs = _inputs(fam, vlm)
    batch = vlm.prepare(ims, prs)
    dims = [3, 10, 41]
    res = mv.run(vlm, ims, prs, probes=[SinkChannels(dims=dims, threshold=2.5), NormTracker(),
                                        ViTSinks(layer=-1, threshold=3.0)])
    sc, nt, vs = res["sink_channels"], res["norm_tracker"], res["vit_sinks"]
    st = _hooked_states(vlm, batch)
    att = batch.inputs["attention_mask"].bool()
    bos_pos = att.int().argmax(1)
    rows = att.nonzero()[:, 0]
    # φ and BOS cosine at every sublayer
    for site in sc.sites:
        x = st[site].float()
        xs = x[att]
        phi = xs[:, dims].abs().max(-1).values / xs.pow(2).mean(-1).sqrt()
        torch.testing.assert_close(sc.phi[site], phi, atol=ATOL, rtol=0)
        bos = x[torch.arange(len(x)), bos_pos][rows]
        cos = (xs * bos).sum(-1) / (xs.norm(dim=-1) * bos.norm(dim=-1))
        torch.testing.assert_close(sc.bos_cos[site], cos, atol=ATOL, rtol=0)
    df = sc.to_pandas()
    assert (df.sink == (df.phi > 2.5)).all()
    assert len(sc.sites) == 1 + 2 * vlm.n_layers
    # rank tracking: the tracked tokens are rank 1..5 at the reference site
    rt = sc.rank_tracking()
    ref = rt[rt.site == sc.reference_site]
    for _, g in ref.groupby("row"):
        assert sorted(g["rank"]) == list(range(1, min(5, len(g)) + 1))
    # norms + layer-to-layer cosine, both towers
    nd = nt.to_pandas()
    prev = None
    for site in nt.data:
        x = st[site].float()
        x = x.reshape(-1, x.shape[-1]) if site.startswith("vision.") else x[att]
        torch.testing.assert_close(nt.data[site]["l2"], x.norm(dim=-1), atol=ATOL, rtol=1e-6)
        torch.testing.assert_close(nt.data[site]["l1"], x.abs().sum(-1), atol=ATOL, rtol=1e-6)
        if site.endswith(".hook_deepstack"):  # an injected vector: its own norm, outside the cos chain
            assert nt.data[site]["cos_prev"].isnan().all()
            continue
        if site in ("vision.blocks.0.hook_resid_post", "hook_embed"):
            assert nt.data[site]["cos_prev"].isnan().all()
        else:
            torch.testing.assert_close(nt.data[site]["cos_prev"], F.cosine_similarity(x, prev, dim=-1),
                                       atol=ATOL, rtol=0)
        prev = x
    g = nt.by_group(kinds=("patch", "thumbnail", "newline", "cls"))  # every visual token, as the reference below
    lm0 = g[(g.site == "hook_embed") & (g.group == "visual")].l2.item()
    assert lm0 == pytest.approx(st["hook_embed"][batch.visual_mask].float().norm(dim=-1).mean().item(), abs=1e-4)
    assert set(nd.group) >= {"visual", "text"}
    # ViT sinks: last vision layer, max over the merged rows
    last = f"vision.blocks.{vlm.n_vision_layers - 1}.hook_resid_post"
    norms = st[last].float().reshape(-1, st[last].shape[-1]).norm(dim=-1)
    ref = _max_over_rows(norms, batch.tokens)
    torch.testing.assert_close(vs.l2, ref, atol=ATOL, rtol=1e-6, equal_nan=True)
    assert torch.equal(vs.sinks, ref > 3.0)
    assert vs.site == last


def _max_over_rows(norms, tokens):
    """Per visual token the max row norm over the vision rows it is built from (weight > 0), NaN for a token with
    none (a newline token): a plain loop over the geometry table."""
    out = []
    for rows, w in zip(tokens["vision_rows"].tolist(), tokens["vision_weights"].tolist()):
        used = [r for r, x in zip(rows, w) if x > 0]
        out.append(max(float(norms[r]) for r in used) if used else float("nan"))
    return torch.tensor(out)


def _llava_with_massive_activations(path, words, dims, value=1.0):
    """A tiny LLaVA whose input embeddings of ``words`` carry ``value`` in channels ``dims``."""
    model, proc = T.build("llava")
    ids = proc.tokenizer.convert_tokens_to_ids(words)
    with torch.no_grad():
        E = model.get_input_embeddings().weight
        for i in ids:
            E[i, dims] = value
    return T._save(model, proc, path), ids


def test_planted_massive_activations_are_discovered_and_flagged(tmp_path):
    from mech_vtokens.probes import SinkChannels

    dims = [5, 17]
    path, ids = _llava_with_massive_activations(tmp_path / "massive", ["USER", "red"], dims)
    vlm = mv.load(path)
    ims = [T.image(84, 0), T.image(84, 1)]
    prs = [T.prompt("llava", "is the red circle on the left ?"), T.prompt("llava", "what is it ?")]
    sc = mv.run(vlm, ims, prs, probes=[SinkChannels(dims="auto", threshold=4.0)])["sink_channels"]
    assert sc.sink_dims == dims
    batch = vlm.prepare(ims, prs)
    att = batch.inputs["attention_mask"].bool()
    want = torch.isin(batch.inputs["input_ids"], torch.tensor(ids))[att]
    assert want.sum() == 3  # USER twice (the BOS role) + red once
    for site in sc.sites:
        assert torch.equal(sc.sinks(site), want), site
    st = _hooked_states(vlm, batch)
    for site in sc.sites:
        xs = st[site][att].float()
        phi = xs[:, dims].abs().max(-1).values / xs.pow(2).mean(-1).sqrt()
        got = sc.phi[site]
        known = ~got.isnan()
        assert known[want].all()
        torch.testing.assert_close(got[known], phi[known], atol=ATOL, rtol=0)
        assert (phi[~known] < 4.0).all()


# ------------------------------------------------------------------------------------------------------------------
# Label matching A(ℓ)
# ------------------------------------------------------------------------------------------------------------------

def test_label_matching_on_planted_tokens(tmp_path):
    from mech_vtokens.probes import LabelMatching

    tok = T.build("llava")[1].tokenizer
    targets = dict(zip([0, 7], tok.convert_tokens_to_ids(["cat", "dog"])))
    vlm = mv.load(_llava_with_planted_tokens(tmp_path / "planted2", targets, tok.convert_tokens_to_ids("the")))
    ims, prs = [T.image(84, 3), T.image(84, 4)], [T.prompt("llava"), T.prompt("llava")]
    labels = [["cat", "dog", "house"], ["Cat"]]
    res = mv.run(vlm, ims, prs, probes=[LabelMatching(labels, k=1), EmbedLens(k=1)])
    lm, el = res["label_matching"], res["embed_lens"]
    df = lm.to_pandas()
    emb = df[(df.lens == "EmbedLens") & (df.site == "hook_embed")]
    assert emb.accuracy.item() == pytest.approx(3 / 4) and emb.n_labels.item() == 4
    hits = lm.hits()
    h = hits[(hits.lens == "EmbedLens") & (hits.site == "hook_embed")].set_index(["image", "label"]).hit
    assert h[(0, "cat")] and h[(0, "dog")] and not h[(0, "house")] and h[(1, "Cat")]
    # same numbers from an EmbedLens result computed alongside
    again = LabelMatching.score(el, labels, vlm.tokenizer, vlm.prepare(ims, prs)).to_pandas()
    pd_emb = df[df.lens == "EmbedLens"].reset_index(drop=True)
    assert (again.accuracy.to_numpy() == pd_emb.accuracy.to_numpy()).all()
    assert set(df.lens) == {"EmbedLens", "LogitLens"}


def test_label_rules():
    from mech_vtokens.probes.label_matching import label_token_ids

    tok = T.build("llava")[1].tokenizer
    cat = tok.convert_tokens_to_ids("cat")
    assert label_token_ids(tok, "cat") == [[cat]]
    assert label_token_ids(tok, "red circle") == []
    red, circle = tok.convert_tokens_to_ids(["red", "circle"])
    assert label_token_ids(tok, "red circle", "first") == [[red]]
    assert label_token_ids(tok, "red circle", "all") == [[red, circle]]
    assert label_token_ids(tok, "zebra", "all") == []


# ------------------------------------------------------------------------------------------------------------------
# Composition: every probe in one forward, any order, remote="local" == each alone.
# ------------------------------------------------------------------------------------------------------------------

def _suite():
    from mech_vtokens.probes import LabelMatching, NormTracker, SinkChannels, ViTSinks

    return [EmbedLens(k=3), LogitLens(k=3, logprobs=True), SinkChannels(threshold=3.0), NormTracker(),
            ViTSinks(threshold=3.0), LabelMatching([["cat"], ["red", "dog"]], k=5)]


@pytest.mark.parametrize("fam", ["llava", "qwen2_5_vl"])
def test_all_probes_in_one_forward_any_order_and_remote_local(tiny_vlm, fam):
    import pandas as pd

    vlm = tiny_vlm(fam)
    ims, prs = _inputs(fam)
    alone = {p.name: mv.run(vlm, ims, prs, probes=[p])[p].to_pandas() for p in _suite()}
    together = {k: r.to_pandas() for k, r in mv.run(vlm, ims, prs, probes=_suite()).items()}
    rev = {k: r.to_pandas() for k, r in mv.run(vlm, ims, prs, probes=_suite()[::-1]).items()}
    remote = {k: r.to_pandas() for k, r in mv.run(vlm, ims, prs, probes=_suite()[::-1], remote="local").items()}
    assert set(alone) == set(together) == set(rev) == set(remote) and len(alone) == len(_suite())
    for a, t, r, rm in ((alone[k], together[k], rev[k], remote[k]) for k in alone):
        for other in (t, r, rm):
            pd.testing.assert_frame_equal(a, other, check_exact=False, atol=1e-6, rtol=0)


def test_plots_draw(tiny_vlm):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vlm = tiny_vlm("internvl")
    ims, prs = _inputs("internvl")
    for r in mv.run(vlm, ims, prs, probes=_suite()).values():
        r.plot()
        plt.close("all")


# ------------------------------------------------------------------------------------------------------------------
# Bad input of the other probes, before the forward.
# ------------------------------------------------------------------------------------------------------------------

def test_bad_probe_input_before_the_forward(tiny_vlm):
    from mech_vtokens.probes import LabelMatching, NormTracker, SinkChannels, ViTSinks

    vlm = tiny_vlm("llava")
    ims, prs = _inputs("llava")
    cases = [
        (SinkChannels(dims="llama2-7b"), "outside the hidden size"),
        (SinkChannels(dims=[3, 64]), "outside the hidden size"),
        (SinkChannels(reference_site="blocks.0.hook_attn_out"), "reference_site"),
        (SinkChannels(sites=["vision.blocks.0.hook_resid_post"]), "residual stream"),
        (ViTSinks(layer=5), "out of range"),
        (LabelMatching([["zebra"], ["cat"]]), "zebra"),
        (LabelMatching([["red circle"], ["cat"]]), "single token"),
        (LabelMatching([["cat"]]), "one list of label strings per image"),
        (NormTracker(groups=["a", "b"]), "labels but the batch has"),
    ]
    for probe, msg in cases:
        with pytest.raises(InputError, match=msg):
            mv.run(vlm, ims, prs, probes=[probe])
    for probe in (ViTSinks(), NormTracker(), LabelMatching([])):
        with pytest.raises(InputError, match="none|needs an image|per image"):
            mv.run(vlm, None, ["USER : what color is it ? ASSISTANT :"], probes=[probe])
    for make, msg in [(lambda: SinkChannels(dims="llama3"), "preset"), (lambda: SinkChannels(threshold=0), "positive"),
                      (lambda: LabelMatching([["cat"]], rule="stem"), "rule"),
                      (lambda: NormTracker(vision=False, lm=False), "reads nothing")]:
        with pytest.raises(InputError, match=msg):
            make()
