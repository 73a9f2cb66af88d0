"""GLM-4.1V (dense ``glm4v``) and GLM-4.5V (MoE ``glm4v_moe``): what the family does differently, each against an
independent reference.

The family-parametrised tests (sites vs HF, geometry marker, every probe vs plain torch, every intervention vs a
reference forward, generation, partition, remote="local") run on the tiny fixtures and the real-file fixtures
(zai-org/GLM-4.1V-9B-Thinking, zai-org/GLM-4.5V) too; here: the dense model's sandwich norms (the residual
decomposition holds with the declared sites and fails with the pre-norm ones) and the MoE model's plain layer, the
M-RoPE ids the LM receives against a hand computation of the processor's grid, the boxes against the image
processor's own resize arithmetic, the vision rows against a plain-torch downsample + merger, the processor built
without torchvision and its image token, and the GLM-4.6V ``glm46v`` wrapper.
"""

from __future__ import annotations

import pytest
import torch

import mech_vtokens as mv
from mech_vtokens import testing as T
from mech_vtokens.adapters.base import _BLOCK_SITES, _resolve
from mech_vtokens.adapters.glm4v import _GLM4_BLOCK_SITES
from mech_vtokens.errors import InputError
from mech_vtokens.probes.activations import Activations

import families as FM
from intervention_refs import batch_of, clean_lm_kwargs, nn_run

DENSE = ("glm4v", "zai-org/GLM-4.1V-9B-Thinking")
MOE = ("glm4v_moe", "zai-org/GLM-4.5V")
HOOKS = ("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_resid_post")


def _acts(vlm, batch, sites):
    return nn_run(vlm, batch, [], [Activations(sites)])[1]["activations"]


def _decomposition_gaps(vlm, batch, adapter=None):
    """Per layer, max |resid_pre + attn_out - resid_mid| and |resid_mid + mlp_out - resid_post| (with ``adapter``'s
    site declarations when given)."""
    right = vlm.adapter
    vlm.adapter = adapter or right
    try:
        a = _acts(vlm, batch, [f"blocks.{i}.{h}" for i in range(vlm.n_layers) for h in HOOKS])
    finally:
        vlm.adapter = right
    out = []
    for i in range(vlm.n_layers):
        pre, attn, mid, mlp, post = (a[f"blocks.{i}.{h}"] for h in HOOKS)  # added in the model's dtype, as it does
        out.append((float((pre + attn).float().sub(mid.float()).abs().max()),
                    float((mid + mlp).float().sub(post.float()).abs().max())))
    return out, a


# ---- decoder layers: sandwich norms (dense) / plain pre-norm (MoE) ------------------------------------------------

@pytest.mark.parametrize("family", DENSE)
def test_residual_decomposition_with_sandwich_norms(tiny_vlm, family):
    """resid_pre + attn_out == resid_mid and resid_mid + mlp_out == resid_post BIT FOR BIT: attn_out / mlp_out are
    read after post_self_attn_layernorm / post_mlp_layernorm (what GLM-4 adds to the residual), resid_mid at the
    pre-MLP norm (named post_attention_layernorm). Planted mistake: the pre-norm declaration (the attention / MLP
    module outputs) on the same model breaks it."""
    vlm = tiny_vlm(family)
    b = batch_of(vlm, family)
    gaps, a = _decomposition_gaps(vlm, b)
    assert gaps == [(0.0, 0.0)] * vlm.n_layers
    for i in range(vlm.n_layers - 1):
        assert torch.equal(a[f"blocks.{i}.hook_resid_post"], a[f"blocks.{i + 1}.hook_resid_pre"])
    wrong = type("PreNormGlm", (type(vlm.adapter),), {"block_sites": _BLOCK_SITES})(vlm.hf)
    bad, _ = _decomposition_gaps(vlm, b, wrong)
    assert min(max(g) for g in bad) > 1e-2, bad
    # the post-norms differ from the raw sublayer outputs (their weights are not 1): the site really moved
    assert vlm.adapter.site("blocks.0.hook_attn_out")[1].endswith("post_self_attn_layernorm")
    assert vlm.adapter.site("blocks.0.hook_resid_mid")[1].endswith("post_attention_layernorm")


@pytest.mark.parametrize("family", MOE)
def test_moe_layers_have_no_post_norms_and_sparse_mlp_sites(tiny_vlm, family):
    """GLM-4.5V's decoder layers have no post-sublayer norms: the default pre-norm sites decompose the residual bit
    for bit (the dense family's sandwich declaration names modules the MoE layer does not have). Layer 0 is a dense
    MLP (first_k_dense_replace), the others the sparse block; hook_mlp_out at a sparse layer == routed experts +
    shared experts recomputed by plain torch from hook_resid_mid."""
    vlm = tiny_vlm(family)
    assert vlm.adapter.block_sites == _BLOCK_SITES
    layers = _resolve(vlm.hf, vlm.adapter.decoder_layers)
    assert not hasattr(layers[0], "post_self_attn_layernorm")
    b = batch_of(vlm, family)
    gaps, a = _decomposition_gaps(vlm, b)
    assert gaps == [(0.0, 0.0)] * vlm.n_layers
    sandwich = type("SandwichMoe", (type(vlm.adapter),), {"block_sites": _GLM4_BLOCK_SITES})(vlm.hf)
    with pytest.raises(AttributeError):  # the dense declaration names a module the MoE layer does not have
        _resolve(vlm.hf, sandwich.site("blocks.1.hook_attn_out")[1])
    kinds = [type(layer.mlp).__name__ for layer in layers]
    assert kinds[0] == "Glm4vMoeTextMLP" and all(k == "Glm4vMoeTextMoE" for k in kinds[1:]), kinds
    moe = layers[1].mlp
    with torch.no_grad():
        x = layers[1].post_attention_layernorm(a["blocks.1.hook_resid_mid"])
        flat = x.reshape(-1, x.shape[-1])
        _, w, idx = moe.gate(flat)
        routed = torch.zeros_like(flat)
        for e in range(moe.experts.num_experts):
            rows, slot = (idx == e).nonzero(as_tuple=True)
            if len(rows):
                gate_up = flat[rows] @ moe.experts.gate_up_proj[e].T
                g, u = gate_up.chunk(2, dim=-1)
                out = (moe.experts.act_fn(g) * u) @ moe.experts.down_proj[e].T
                routed.index_add_(0, rows, (out * w[rows, slot, None]).to(routed.dtype))
        want = routed.reshape(x.shape) + moe.shared_experts(x)
    got = a["blocks.1.hook_mlp_out"]
    tol = 1e-5 if got.dtype == torch.float32 else 3e-2
    assert (got.float() - want.float()).abs().max() < tol * max(1.0, float(want.abs().max()))


# ---- M-RoPE: the position ids the LM receives ---------------------------------------------------------------------

def _hand_mrope(ids, grids, image_token, merge):
    """(3, seq) M-RoPE ids of one unpadded row, by hand: text counts on in all three axes; an image of r x c merged
    cells starts at the next position p and holds (p, p + row, p + col); the text after it resumes at
    p + max(r, c)."""
    out, p, k, j = [], 0, 0, 0
    while j < len(ids):
        if ids[j] != image_token:
            out.append((p, p, p))
            p += 1
            j += 1
            continue
        _, gh, gw = grids[k]
        rows, cols = gh // merge, gw // merge
        out += [(p, p + r, p + c) for r in range(rows) for c in range(cols)]
        j += rows * cols
        p += max(rows, cols)
        k += 1
    return torch.tensor(out).T


@pytest.mark.parametrize("family", DENSE + MOE)
def test_mrope_ids_match_a_hand_computation_of_the_grid(tiny_vlm, family):
    """The (3, batch, seq) ids the wrapper hands the LM (captured by a plain hook) equal the hand computation from
    input_ids and the processor's image_grid_thw (two images of different aspect ratio in one prompt, a
    left-padded second row: its real tokens count from 0). Planted mistake: the Qwen2-VL convention of text resuming
    at p + rows + cols ... differs on the non-square image."""
    vlm = tiny_vlm(family)
    images = [[T.image(112, 1), T.image(112, 2).resize((112, 56))], [T.image(112, 3)]]
    span = vlm.image_placeholder
    if FM.is_real(family):
        prompts = [vlm.prompt("what color is it ?", n_images=2), vlm.prompt("describe the image")]
    else:
        prompts = [T.prompt(family, n_images=2), T.prompt(family, "describe the image")]
    assert prompts[0].count(span) == 2
    b = vlm.prepare(images, prompts)
    pos = clean_lm_kwargs(vlm, b)["position_ids"]
    assert pos.shape == (3,) + tuple(b.inputs["input_ids"].shape)
    grids = b.inputs["image_grid_thw"].tolist()
    assert grids[1][1] != grids[1][2]  # a non-square grid: rows != cols
    merge = vlm.hf.config.vision_config.spatial_merge_size
    per_row = [grids[:2], grids[2:]]
    for r in range(2):
        real = b.inputs["attention_mask"][r].bool()
        ids = b.inputs["input_ids"][r][real].tolist()
        want = _hand_mrope(ids, per_row[r], vlm.adapter.image_token_id, merge)
        assert torch.equal(pos[:, r][:, real].cpu(), want), r
    # the mistake a Qwen-style "+ rows + cols" resume would make shows on this batch
    ids0 = b.inputs["input_ids"][0][b.inputs["attention_mask"][0].bool()].tolist()
    end_of_second = max(j for j, t in enumerate(ids0) if t == vlm.adapter.image_token_id)
    _, gh, gw = per_row[0][1]
    resumed = int(pos[0, 0][b.inputs["attention_mask"][0].bool()][end_of_second + 1])
    first_of_second = int(pos[0, 0][b.inputs["attention_mask"][0].bool()][end_of_second])  # t axis = p
    assert resumed == first_of_second + max(gh, gw) // merge != first_of_second + (gh + gw) // merge


# ---- geometry: the image processor's own resize, the merge-block vision rows --------------------------------------

@pytest.mark.parametrize("family", DENSE + MOE)
def test_boxes_follow_the_image_processors_resize(tiny_vlm, family):
    """A non-square image: the grid is what the image processor's own smart_resize gives (factor 28, both temporal
    copies counted against the pixel bounds), token (r, c) the box (c, r, c + 1, r + 1) * 28 px of the resized image
    scaled back to the original. Planted mistake: counting one temporal copy (Qwen2-VL's bound) changes the grid of
    the tiny fixture."""
    from transformers.models.glm4v.image_processing_pil_glm4v import smart_resize

    vlm = tiny_vlm(family)
    ip = vlm.processor.image_processor
    w, h = 300, 130
    img = T.image(112, 4).resize((w, h))
    b = vlm.prepare([img], [FM.prompt(vlm, family)])
    unit = ip.patch_size * ip.merge_size
    rh, rw = smart_resize(num_frames=ip.temporal_patch_size, height=h, width=w,
                          temporal_factor=ip.temporal_patch_size, factor=unit,
                          min_pixels=ip.size["shortest_edge"], max_pixels=ip.size["longest_edge"])
    rows, cols = rh // unit, rw // unit
    assert b.grids == [{"rows": rows, "cols": cols, "tiles": 1}] and b.n_visual == rows * cols
    assert b.inputs["image_grid_thw"].tolist() == [[1, rh // ip.patch_size, rw // ip.patch_size]]
    tok = b.tokens
    for j in (0, cols + 1, rows * cols - 1):
        r, c = divmod(j, cols)
        assert (int(tok["row"][j]), int(tok["col"][j])) == (r, c)
        want = [c * unit * w / rw, r * unit * h / rh, (c + 1) * unit * w / rw, (r + 1) * unit * h / rh]
        assert tok["box"][j].tolist() == pytest.approx(want)
    if not FM.is_real(family):  # the tiny bounds bite: one temporal copy would allow a larger grid
        r1, w1 = smart_resize(num_frames=1, height=h, width=w, temporal_factor=1, factor=unit,
                              min_pixels=ip.size["shortest_edge"], max_pixels=ip.size["longest_edge"])
        assert (r1 // unit, w1 // unit) != (rows, cols)


@pytest.mark.parametrize("family", DENSE + MOE)
def test_vision_rows_are_the_patches_the_downsample_merges(tiny_vlm, family):
    """Each token's vision rows are the 4 consecutive patch rows (merge-block order) that GLM's post_layernorm ->
    view(-1, 2, 2, C) -> downsample conv -> merger turns into its projector row: recomputed by plain torch from the
    last vision block's output (a forward hook), == the projector output at that token's row. Planted mistake: the
    raster-order patches of the token's 2 x 2 cell (the grid read row by row) give another vector."""
    vlm = tiny_vlm(family)
    img = T.image(112, 5).resize((112, 84))
    b = vlm.prepare([img], [FM.prompt(vlm, family)])
    visual = vlm.hf.model.visual
    got = {}
    hook = visual.blocks[-1].register_forward_hook(lambda m, i, o: got.__setitem__("h", o))
    try:
        proj = mv.run(vlm, [img], b.prompts, probes=[Activations(["vision_projector.hook_out"])])["activations"]
    finally:
        hook.remove()
    out = proj["vision_projector.hook_out"].reshape(-1, vlm.adapter.d_model)
    h = got["h"]
    tok = b.tokens
    _, gh, gw = b.inputs["image_grid_thw"][0].tolist()
    m = vlm.hf.config.vision_config.spatial_merge_size

    def merged(rows):
        with torch.no_grad():
            x = visual.post_layernorm(h[rows]).view(1, m, m, -1).permute(0, 3, 1, 2)
            return visual.merger(visual.downsample(x).view(1, -1))[0]

    worst, raster_gap = 0.0, 0.0
    for j in range(b.n_visual):
        rows = tok["vision_rows"][j].tolist()
        assert rows == list(range(4 * j, 4 * j + 4))
        ref = merged(rows)
        worst = max(worst, float((out[int(tok["projector_rows"][j])].float() - ref.float()).abs().max()))
        r, c = int(tok["row"][j]), int(tok["col"][j])
        raster = [(m * r + a) * gw + m * c + d for a in range(m) for d in range(m)]  # row-major patch indices
        if raster != rows:
            raster_gap = max(raster_gap, float((merged(raster).float() - ref.float()).abs().max()))
    scale = float(out.abs().max())
    tol = (1e-5 if out.dtype == torch.float32 else 1e-2) * scale
    assert worst <= tol, (worst, scale)
    assert raster_gap > 10 * tol, (raster_gap, scale)


# ---- processor -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("checkpoint,image_id", [("zai-org/GLM-4.1V-9B-Thinking", 151343),
                                                 ("zai-org/GLM-4.5V", 151363)])
def test_processor_without_torchvision_and_its_image_token(tiny_vlm, checkpoint, image_id):
    """The processor is built from the hub files without its video part (the video processor needs torchvision):
    Glm4vProcessor, no video processor; <|image|> is config.image_token_id (151343 on GLM-4.1V, 151363 on the
    GLM-4.5 tokenizer), the span <|begin_of_image|><|image|><|end_of_image|> is what the chat template writes. The
    other checkpoint's processor (its <|image|> at the other id) is refused naming the ids."""
    vlm = tiny_vlm(checkpoint)
    assert type(vlm.processor).__name__ == "Glm4vProcessor"
    assert getattr(vlm.processor, "video_processor", None) is None
    assert vlm.adapter.image_token_id == image_id == vlm.processor.image_token_id
    assert vlm.tokenizer.convert_tokens_to_ids("<|image|>") == image_id
    assert vlm.image_placeholder == "<|begin_of_image|><|image|><|end_of_image|>"
    text = vlm.prompt("what color is it ?", n_images=2)
    assert text.startswith("[gMASK]<sop>") and text.count(vlm.image_placeholder) == 2
    assert text.endswith("<|assistant|>\n")
    # the system text reaches the template as the string it prints (GLM-4.1V: {{ msg.content }}), not a parts list
    with_system = vlm.prompt("what color is it ?", system="answer in one word")
    assert "<|system|>\nanswer in one word<|user|>" in with_system and "'type'" not in with_system
    other = tiny_vlm(next(c for c in FM.REAL if c.startswith("zai-org/") and c != checkpoint))
    with pytest.raises(InputError, match="does not match"):
        vlm.adapter.check_processor(other.processor)


# ---- GLM-4.6V's glm46v wrapper ---------------------------------------------------------------------------------------

def test_glm46v_wrapper_is_served_by_the_dense_adapter(tiny_vlm):
    """transformers' ``glm46v`` (Glm46VForConditionalGeneration: the Glm4v model with AutoModel-built towers; what
    GLM-4.6V-Flash-style configs can name) with the tiny GLM-4.1V weights: the dense adapter serves it and every
    site equals the glm4v model's bit for bit."""
    from transformers import Glm46VConfig, Glm46VForConditionalGeneration

    base = tiny_vlm("glm4v")
    cfg = base.hf.config.to_dict()
    keep = {k: cfg[k] for k in ("image_token_id", "video_token_id", "image_start_token_id", "image_end_token_id",
                                "video_start_token_id", "video_end_token_id", "tie_word_embeddings")}
    config = Glm46VConfig(text_config=dict(cfg["text_config"], model_type="glm4v_text"),
                          vision_config=dict(cfg["vision_config"], model_type="glm4v_vision"), **keep)
    hf = Glm46VForConditionalGeneration(config).eval()
    missing, unexpected = hf.load_state_dict(base.hf.state_dict(), strict=False)
    assert not missing and not unexpected
    vlm = mv.load(hf, base.processor)
    assert vlm.adapter.family == "glm4v" and vlm.hf.config.model_type == "glm46v"
    b = batch_of(base, "glm4v")
    sites = ["vision_projector.hook_out", "blocks.1.hook_attn_out", "blocks.2.hook_mlp_out", "unembed.hook_out"]
    a, c = _acts(base, b, sites), _acts(vlm, b, sites)
    for s in sites:
        assert torch.equal(a[s], c[s]), s
