"""Token partition (paper Secs. 4-6, App. B): hand-computed clustering / cross-image similarity, planted partitions
recovered by both rules on five families (Qwen3-VL with DeepStack on, LLaVA-OneVision with base image, canvas and
newline tokens), pruning dead vs matched random, persistence, bad input."""

import numpy as np
import pytest
import torch

import mech_vtokens as mv
from mech_vtokens import testing as T
from mech_vtokens.errors import InputError
from mech_vtokens.partition import (GROUPS, Partition, anchor_clusters, calibrate, cross_image_similarity,
                                    max_similarity)

PLANTED = ("llava", "qwen2_5_vl", "internvl", "qwen3_vl", "llava_onevision")


# ------------------------------------------------------------------------------------------------------------------
# Clustering and cross-image similarity vs hand computations
# ------------------------------------------------------------------------------------------------------------------

def test_anchor_clusters_exact_members():
    x = torch.tensor([[1.0, 0, 0], [0.99, 0.1, 0], [0, 1, 0], [0, 0.95, 0.1], [0, 0, 1], [2.0, 0.1, 0]])
    c = anchor_clusters(x, 0.9)
    assert c.members == [[0, 1, 5], [2, 3], [4]]
    assert c.anchors == [0, 2, 4]
    assert c.labels.tolist() == [0, 0, 1, 1, 2, 0]
    assert c.top_sizes(5) == [3, 2, 1, 0, 0]
    torch.testing.assert_close(c.centroids[0], x[[0, 1, 5]].mean(0))
    # the anchor rule: the token with the most neighbours (the middle of a chain 0°-20°-40°) anchors first
    ang = torch.deg2rad(torch.tensor([0.0, 20.0, 40.0, 90.0]))
    chain = torch.stack([ang.cos(), ang.sin()], 1)
    c = anchor_clusters(chain, 0.9)  # cos 20° = 0.94 >= 0.9 > cos 40° = 0.77
    assert c.members == [[0, 1, 2], [3]] and c.anchors == [1, 3]
    # τ = 1 joins identical vectors only
    assert anchor_clusters(torch.tensor([[1.0, 2], [1, 2], [2, 1]]), 1.0).members == [[0, 1], [2]]


def test_cross_image_similarity_hand_computation():
    a = torch.tensor([[1.0, 0], [0, 1]])
    b = torch.tensor([[1.0, 0], [0.6, 0.8]]) * 3  # normalisation is part of the definition
    c = torch.tensor([[0.0, 1]])
    torch.testing.assert_close(max_similarity(a, b), torch.tensor([1.0, 0.8]))
    ci = cross_image_similarity([a, b, c])
    rank0 = torch.tensor([1, 0, 1, 0, 1, 0.8])  # A->B, A->C, B->A, B->C, C->A, C->B
    rank1 = torch.tensor([0.8, 1, 0.8, 0.8])  # C has one cluster
    torch.testing.assert_close(ci.mean, torch.stack([rank0.mean(), rank1.mean()]))
    torch.testing.assert_close(ci.var, torch.stack([rank0.var(unbiased=False), rank1.var(unbiased=False)]))
    assert ci.n_pairs.tolist() == [6, 4]
    assert list(ci.to_pandas().columns) == ["cluster", "similarity_mean", "similarity_var", "n_pairs"]


def test_clustering_bad_input():
    for tau in (0, -0.1, 1.5, "x"):
        with pytest.raises(InputError, match=r"\(0, 1\]"):
            anchor_clusters(torch.eye(3), tau)
    with pytest.raises(InputError, match="at least 2 images"):
        cross_image_similarity([torch.eye(2)])


# ------------------------------------------------------------------------------------------------------------------
# Planted partitions
# ------------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted_partition")
    cache = {}

    def get(fam):
        if fam not in cache:
            path, truth = T.planted_partition_model(fam, root / fam)
            cache[fam] = (mv.load(path), truth)
        return cache[fam]

    return get


def _accuracy(result, labelled, newline="dead"):
    """Accuracy vs the planted labels (a cell's label; anyres: the base-image and canvas tokens of a cell share it,
    newline tokens are ``truth["newline"]``)."""
    df = result.to_pandas()
    want = np.array([newline if k == "newline" else labelled[i][1][r][c]
                     for i, r, c, k in zip(df.image, df.grid_row, df.grid_col, df.kind)])
    return float((df.group.to_numpy() == want).mean()), want


@pytest.mark.parametrize("fam", PLANTED)
def test_both_rules_recover_the_planted_partition(planted, fam):
    vlm, truth = planted(fam)
    pr = T.prompt(fam)
    cal = [T.planted_image(truth, s)[0] for s in range(20)]
    unseen = [T.planted_image(truth, 1000 + s) for s in range(100)]
    kw = dict(vit_threshold=truth["vit_threshold"], phi_threshold=truth["phi_threshold"])
    stat = calibrate(vlm, cal, pr, batch_size=20, **kw)
    assert stat.info["n_forwards"] == 1  # 20 images, one batch
    assert stat.llm["dims"] == truth["sink_dims"]  # discovered from the BOS-role token
    ref = calibrate(vlm, cal, pr, rule="reference", batch_size=20, **kw)
    assert ref.reference["ids"] == {g: [truth["ref_ids"][g]] for g in GROUPS[:3]}  # derived, not given
    for part in (stat, ref):
        res = part.classify([im for im, _ in unseen], pr, batch_size=20)
        assert res.n_forwards == 5  # 100 images: one forward per batch of 20
        acc, want = _accuracy(res, unseen)
        assert acc >= 0.99, (part.rule, acc)
        for g in GROUPS:  # every planted group is present and recovered
            assert (want == g).sum() > 0
    # remote="local": the in-trace classification ships by value
    res = stat.classify([im for im, _ in unseen[:4]], pr, remote="local")
    assert _accuracy(res, unseen[:4])[0] >= 0.99


def test_qwen3_vl_planted_deepstack_carries_each_tokens_code(planted):
    """The planted Qwen3-VL's DeepStack is on and not zero: after LM layers 0 and 1 it adds, at every sink / dead
    token (uniform cells: the merged patches are identical), exactly ``truth["deepstack_scales"][i]`` x the token's
    LM input (the same code; a scale per layer, so each layer's addend is told apart), and a non-zero vector at the
    alive ones; the partition above is recovered with it."""
    from mech_vtokens.probes import Activations

    vlm, truth = planted("qwen3_vl")
    pairs = [T.planted_image(truth, 300 + s) for s in range(2)]
    sites = ["hook_embed"] + [f"blocks.{i}.{vlm.adapter.injection[0]}" for i in vlm.adapter.injection_layers()]
    assert sites[1:] == ["blocks.0.hook_deepstack", "blocks.1.hook_deepstack"]
    act = mv.run(vlm, [im for im, _ in pairs], [T.prompt("qwen3_vl")] * 2,
                 probes=[Activations(sites, visual_only=True)])["activations"]
    batch = vlm.prepare([im for im, _ in pairs], [T.prompt("qwen3_vl")] * 2)
    t = batch.tokens
    want = np.array([pairs[int(i)][1][int(r)][int(c)] for i, r, c in zip(t["image"], t["row"], t["col"])])
    uniform = torch.as_tensor(want != "alive")
    emb = act["hook_embed"].float()
    assert truth["deepstack_scales"] == [0.5, 0.25]
    for s, scale in zip(sites[1:], truth["deepstack_scales"]):
        ds = act[s].float()
        torch.testing.assert_close(ds[uniform], scale * emb[uniform], atol=1e-4, rtol=1e-4, msg=s)
        assert (ds[~uniform].norm(dim=-1) > 0.01).all()  # alive: ~0.06 at scale 0.5, ~0.03 at 0.25


def test_pruning_dead_keeps_logits_closer_than_matched_random(planted):
    from mech_vtokens.interventions import MatchedRandom, Prune
    from mech_vtokens.probes import Activations

    vlm, truth = planted("llava")
    pr = T.prompt("llava")
    part = calibrate(vlm, [T.planted_image(truth, s)[0] for s in range(6)], pr,
                     vit_threshold=truth["vit_threshold"], phi_threshold=truth["phi_threshold"])
    ims = [T.planted_image(truth, 500 + s, content=0.5)[0] for s in range(3)]
    prs = [pr] * 3
    read = Activations(["unembed.hook_out"])

    def last_logits(**kw):
        out = mv.run(vlm, ims, prs, probes=[read], **kw)[read]["unembed.hook_out"]
        return out[:, -1].float()

    base = last_logits()
    dead = last_logits(interventions=[Prune(part.token_set("dead"))])
    rand = last_logits(interventions=[Prune(MatchedRandom(part.token_set("dead"), seed=0))])
    d_dead, d_rand = (dead - base).norm(dim=-1), (rand - base).norm(dim=-1)
    assert (d_dead < 0.1 * d_rand).all() and (d_rand > 1e-3).all(), (d_dead, d_rand)


def test_save_load_and_token_sets(planted, tmp_path):
    vlm, truth = planted("qwen2_5_vl")
    pr = T.prompt("qwen2_5_vl")
    cal = [T.planted_image(truth, s)[0] for s in range(4)]
    for rule in ("statistical", "reference"):
        part = calibrate(vlm, cal, pr, rule=rule, vit_threshold=truth["vit_threshold"],
                         phi_threshold=truth["phi_threshold"])
        back = Partition.load(part.save(tmp_path / rule), vlm)
        ims = [T.planted_image(truth, 77)[0], T.planted_image(truth, 78)[0]]
        a, b = part.classify(ims, pr), back.classify(ims, pr)
        assert torch.equal(a.codes, b.codes)
        batch = vlm.prepare(ims, [pr] * 2)
        assert torch.equal(back.token_set("dead").visual(batch), a.codes == GROUPS.index("dead"))
        assert torch.equal(back.token_set("sinks").visual(batch), a.codes <= 1)
    assert (tmp_path / "statistical" / "partition.json").exists()
    assert (tmp_path / "statistical" / "partition.safetensors").exists()


# ------------------------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------------------------

def test_bad_partition_input(planted, tiny_vlm, tmp_path):
    vlm, truth = planted("llava")
    pr = T.prompt("llava")
    im = T.planted_image(truth, 0)[0]
    with pytest.raises(InputError, match="at least 2 images"):
        calibrate(vlm, [im], pr)
    with pytest.raises(InputError, match=r"\(0, 1\]"):
        calibrate(vlm, [im, im], pr, tau=1.2)
    with pytest.raises(InputError, match="no visual tokens"):
        calibrate(vlm, [[], []], ["USER : hi ASSISTANT :"] * 2)
    with pytest.raises(InputError, match="rule"):
        calibrate(vlm, [im, im], pr, rule="nearest")
    with pytest.raises(InputError, match="vocabulary"):
        calibrate(vlm, [im, im], pr, rule="reference", reference="llava-1.5-7b")
    part = calibrate(vlm, [im, T.planted_image(truth, 1)[0]], pr, vit_threshold=truth["vit_threshold"],
                     phi_threshold=truth["phi_threshold"])
    saved = part.save(tmp_path / "p")
    with pytest.raises(InputError, match="another model"):
        Partition.load(saved, tiny_vlm("llava"))  # same family and shapes, other weights
    with pytest.raises(InputError, match="another model"):
        Partition.load(saved, tiny_vlm("internvl"))
    with pytest.raises(InputError, match="unknown group"):
        part.token_set("zombie")


# ------------------------------------------------------------------------------------------------------------------
# Dynamics, sparsity, summary
# ------------------------------------------------------------------------------------------------------------------

def test_group_dynamics_attention_and_summary(planted):
    from mech_vtokens.partition import GroupDynamics, summarize

    _, truth = planted("llava")
    vlm = mv.load(planted("llava")[0].source, attn_implementation="eager")
    pr = T.prompt("llava")
    ims = [T.planted_image(truth, s)[0] for s in range(4)]
    part = calibrate(vlm, ims, pr, vit_threshold=truth["vit_threshold"], phi_threshold=truth["phi_threshold"])
    gd = mv.run(vlm, ims[:2], [pr] * 2, probes=[GroupDynamics(part)])["group_dynamics"]
    df = gd.to_pandas()
    lm = df[df.layer >= 0]
    # planted: dead keys are pushed to ~-40 attention logits -> no text attention; alive tokens take most of it
    assert (lm[lm.group == "dead"].attention_share < 1e-3).all()
    assert (lm[lm.group == "alive"].attention_share > 0.5).all()
    assert set(gd.entropy()) == set(GROUPS)
    part_res = gd.partition
    assert part_res.fractions()["dead"] > 0.3
    # attention needs eager weights: a clear error otherwise
    sdpa = planted("llava")[0]
    with pytest.raises(InputError, match="eager"):
        mv.run(sdpa, ims[:1], pr, probes=[GroupDynamics(part)])
    summ = summarize(vlm, ims, pr, partition=part).to_pandas().set_index("group")
    assert summ.percent.sum() == pytest.approx(100.0)
    res = part.classify(ims, pr)
    for g in GROUPS:
        assert summ.percent[g] == pytest.approx(100 * res.fractions()[g], abs=1e-4)
    for g in ("vit_sink", "llm_sink", "dead"):  # image-independent by construction
        assert summ.cross_image_similarity[g] > 0.999
    with pytest.raises(InputError, match="at least 2 images"):
        summarize(vlm, ims[:1], pr, partition=part)


def test_semantic_sparsity_equals_hand_computation(planted):
    from mech_vtokens.partition import semantic_sparsity
    from mech_vtokens.probes import Activations

    vlm, truth = planted("llava")
    pr = T.prompt("llava")
    drawn = [T.planted_image(truth, 40 + s) for s in range(2)]
    ims = [im for im, _ in drawn]
    cell, words = truth["cell"], truth["content_words"]
    ann = []  # every content cell is an object box, labelled with a content word (truth from the drawing)
    for i, (_, lab) in enumerate(drawn):
        objs = []
        for r, row in enumerate(lab):
            for c, g in enumerate(row):
                if g == "alive":
                    objs.append({"bbox": [c * cell, r * cell, cell, cell], "label": words[(r + c + i) % 12]})
        ann.append(objs)
    sites = ["hook_embed", "blocks.2.hook_resid_post"]
    res = semantic_sparsity(vlm, ims, pr, annotations=ann, k=5, sites=sites).to_pandas().set_index("site")
    # by hand: plain-torch cosine top-5 against the input embeddings, cell membership from the drawing
    act = mv.run(vlm, ims, [pr] * 2, probes=[Activations(sites, visual_only=True)])["activations"]
    E = torch.nn.functional.normalize(vlm.embedding_matrix.detach().float(), dim=-1)
    batch = vlm.prepare(ims, [pr] * 2)
    t = batch.tokens
    for s in sites:
        top = (torch.nn.functional.normalize(act[s].float(), dim=-1) @ E.T).topk(5).indices
        hit = pairs = grounded = 0
        for j in range(batch.n_visual):
            i, r, c = int(t["image"][j]), int(t["row"][j]), int(t["col"][j])
            ids = {vlm.tokenizer.convert_tokens_to_ids(o["label"]) for o in ann[i]}
            grounded += bool(ids & set(top[j].tolist()))
            for o in ann[i]:
                if o["bbox"][:2] == [c * cell, r * cell]:
                    pairs += 1
                    hit += vlm.tokenizer.convert_tokens_to_ids(o["label"]) in top[j].tolist()
        assert res.object_tokens[s] == pairs
        assert res.object_hit[s] == pytest.approx(hit / pairs)
        assert res.any_grounded[s] == pytest.approx(grounded / batch.n_visual)
    with pytest.raises(InputError, match="bbox"):
        semantic_sparsity(vlm, ims, pr, annotations=[[{"label": "cat"}], []])


def test_figure1_cluster_dominance_on_planted_fixture(planted):
    """Fig. 1 on the planted LLaVA: the dead background forms the largest cluster in every image and it is the same
    cluster across images (similarity ~1); sizes equal an independent anchor clustering of plain-HF embeddings."""
    from mech_vtokens.partition import anchor_clusters, cluster_dominance

    vlm, truth = planted("llava")
    pr = T.prompt("llava")
    drawn = [T.planted_image(truth, 50 + s, content=0.3) for s in range(4)]
    fig = cluster_dominance(vlm, [im for im, _ in drawn], [pr] * 4)
    df = fig.to_pandas()
    assert df.similarity_mean.iloc[0] > 0.999
    for (im, lab), c in zip(drawn, fig.clusters):
        n_dead = sum(x == "dead" for row in lab for x in row)
        assert c.sizes[0] == n_dead  # the largest cluster is exactly the dead background
        batch = vlm.prepare([im], [pr])
        with torch.no_grad():
            emb = vlm.hf(**batch.inputs, output_hidden_states=True).hidden_states[0][batch.visual_mask]
        assert anchor_clusters(emb, 0.9).sizes == c.sizes
    with pytest.raises(InputError, match="at least 2 images"):
        cluster_dominance(vlm, [drawn[0][0]], [pr])
