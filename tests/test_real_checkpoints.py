"""Fixtures from the REAL hub files (mech_vtokens/fixtures/hub): loading, visual-token counts and boxes on non-square
images against the processors' documented rules (written out here, independently of the geometry code), the chat
template across save/load and the prompt layout it gives, and the probe / intervention / generation paths."""

import pytest
import torch

import mech_vtokens as mv
from mech_vtokens import testing as T
from mech_vtokens.fixtures.real import hub_file

CKS = T.REAL_CHECKPOINTS
SIZES = [(150, 110), (90, 200)]  # landscape and portrait, neither square
LOADED = list(CKS)


@pytest.fixture(scope="session")
def real_vlm(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    cache = {}

    def get(ck):
        """The fixture loaded with mv.load (layout check included)."""
        if ck not in cache:
            cache[ck] = mv.load(T.real_model(ck, root / ck.replace("/", "__")))
        return cache[ck]

    return get


def _mt(ck):
    return hub_file(ck, "config.json")["model_type"]


def _messages(n_images=1, text="what color is the object?"):
    return [{"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": text}]}]


def _prompt(vlm):
    return vlm.processor.apply_chat_template(_messages(), add_generation_prompt=True)


def _images():
    return [T.image(112, seed=i).resize(s) for i, s in enumerate(SIZES)]


# ---- independent statements of the processors' rules ------------------------------------------------------
def _llava_boxes(w, h, side=336, p=14):
    """CLIP processor: resize the shortest edge to 336 (long edge int(336 * long / short)), centre crop 336 at
    ((resized - 336) // 2); 24 x 24 patches of 14 px in raster order."""
    if w <= h:
        rw, rh = side, int(side * h / w)
    else:
        rw, rh = int(side * w / h), side
    left, top = (rw - side) // 2, (rh - side) // 2
    out = []
    for r in range(side // p):
        for c in range(side // p):
            x0, y0 = (c * p + left) * w / rw, (r * p + top) * h / rh
            x1, y1 = ((c + 1) * p + left) * w / rw, ((r + 1) * p + top) * h / rh
            out.append((max(0, x0), max(0, y0), min(w, x1), min(h, y1)))
    return out


def _qwen_boxes(w, h, min_pixels, max_pixels, f=28, t=1):
    """Qwen2-VL smart_resize: round each side to a multiple of 28, keep the area within [min, max] pixels; then
    (h/28) x (w/28) merged tokens of 28 x 28 resized pixels. ``t``: frames counted against the bounds (GLM-4V counts
    both temporal copies of a still image: t = 2)."""
    import math

    hb, wb = max(f, round(h / f) * f), max(f, round(w / f) * f)
    if t * hb * wb > max_pixels:
        beta = math.sqrt(t * h * w / max_pixels)
        hb, wb = math.floor(h / beta / f) * f, math.floor(w / beta / f) * f
    elif t * hb * wb < min_pixels:
        beta = math.sqrt(min_pixels / (t * h * w))
        hb, wb = math.ceil(h * beta / f) * f, math.ceil(w * beta / f) * f
    return [(c * f * w / wb, r * f * h / hb, (c + 1) * f * w / wb, (r + 1) * f * h / hb)
            for r in range(hb // f) for c in range(wb // f)]


def _idefics3_tiles(w, h, longest=2048, tile=512):
    """Idefics3 / SmolVLM processor: the longest edge resized to ``longest`` (the other int(longest / aspect),
    rounded up to even), then the longer side rounded up to a multiple of ``tile`` and the other int(that / aspect)
    rounded up too; cut into rows x cols tiles, then the global image. Returns (rows, cols, canvas w, canvas h)."""
    import math

    ar = w / h
    if w >= h:
        rw, rh = longest, int(longest / ar)
        rh += rh % 2
        cw = math.ceil(rw / tile) * tile
        ch = math.ceil(int(cw / ar) / tile) * tile
    else:
        rh, rw = longest, int(longest * ar)
        rw += rw % 2
        ch = math.ceil(rh / tile) * tile
        cw = math.ceil(int(ch * ar) / tile) * tile
    return ch // tile, cw // tile, cw, ch


def _internvl_tiles(w, h, max_num=12, min_num=1, side=448):
    """InternVL dynamic_preprocess: among tilings i x j with min_num <= i*j <= max_num (sorted by count), the one
    whose aspect ratio is closest to the image's (a tie goes to the later one if the image is larger than half of
    its canvas); plus a thumbnail when there is more than one tile. Returns (cols, rows, tiles)."""
    ratios = sorted({(i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1)
                     if min_num <= i * j <= max_num}, key=lambda x: x[0] * x[1])
    ar, best, best_diff = w / h, (1, 1), float("inf")
    for i, j in ratios:
        diff = abs(ar - i / j)
        if diff < best_diff:
            best, best_diff = (i, j), diff
        elif diff == best_diff and w * h > 0.5 * side * side * i * j:
            best = (i, j)
    n = best[0] * best[1]
    return best[0], best[1], n + (1 if n > 1 else 0)


def _anyres_tokens(w, h, pinpoints, side, g, max_tiles=None):
    """LLaVA-NeXT / OneVision anyres, per image: (kind, box) of every visual token in order. The base image (the
    whole image stretched to one tile: g x g tokens); then the canvas: the pinpoint (height, width) that keeps the most
    pixels (ties: least waste), the image resized into it (the scaled side rounded up) and pasted centred, tiles of
    ``side`` px with g x g tokens, the token rows / cols of the padding cropped (the model rounds the scaled side to 7
    digits), row by row with a newline token (no box) after each row. OneVision above ``max_tiles`` tiles' worth
    resizes the canvas (counts only, boxes not written out here)."""
    import math

    best = None
    for H, W in pinpoints:
        s = min(W / w, H / h)
        eff = min(int(w * s) * int(h * s), w * h)
        if best is None or eff > best[0] or (eff == best[0] and H * W - eff < best[1]):
            best = (eff, H * W - eff, H, W)
    H, W = best[2:]
    R, C = H // side * g, W // side * g
    if w / h > C / R:
        pad = (R - int(round(h * C / w, 7))) // 2
        rows, cols = range(pad, R - pad), range(C)
    else:
        pad = (C - int(round(w * R / h, 7))) // 2
        rows, cols = range(R), range(pad, C - pad)
    out = [("thumbnail", (c * w / g, r * h / g, (c + 1) * w / g, (r + 1) * h / g)) for r in range(g) for c in range(g)]
    if max_tiles is not None and math.sqrt(len(rows) * len(cols) / (max_tiles * g * g)) > 1.1:
        return out + [("resized", None)]
    if W / w < H / h:
        nw, nh = W, min(math.ceil(h * W / w), H)
    else:
        nw, nh = min(math.ceil(w * H / h), W), H
    px, py, p = (W - nw) // 2, (H - nh) // 2, side // g
    for r in rows:
        for c in cols:
            x0, y0 = (c * p - px) * w / nw, (r * p - py) * h / nh
            x1, y1 = ((c + 1) * p - px) * w / nw, ((r + 1) * p - py) * h / nh
            out.append(("patch", (max(0, x0), max(0, y0), min(w, x1), min(h, y1))))
        out.append(("newline", None))
    return out


# ---- tests ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ck", LOADED)
def test_load_keeps_real_vocab_dtype_and_template(real_vlm, ck):
    vlm = real_vlm(ck)
    cfg = hub_file(ck, "config.json")
    # gemma-3-4b-it's sparse text_config leaves the vocabulary to the Gemma3TextConfig default (262208, padded)
    vocab = cfg.get("vocab_size") or cfg["text_config"].get("vocab_size") or {"gemma3": 262208}[cfg["model_type"]]
    assert vlm.embedding_matrix.shape[0] == vocab  # padded rows kept
    # Qwen3-VL hub files give the dtype inside text_config only
    assert vlm.hf.dtype == getattr(torch, cfg.get("torch_dtype") or cfg["text_config"]["dtype"])
    assert vlm.processor.chat_template == hub_file(ck, "chat_template.jinja")


@pytest.mark.parametrize("ck", CKS)
def test_visual_tokens_and_boxes_on_non_square_images(real_vlm, ck):
    vlm = real_vlm(ck)
    imgs = _images()
    batch = vlm.prepare([[im] for im in imgs], [_prompt(vlm)] * len(imgs))
    mt = _mt(ck)
    for i, (w, h) in enumerate(SIZES):
        sel = batch.tokens["image"] == i
        n_in_ids = int(batch.visual_mask[i].sum())
        if mt == "llava":
            want = _llava_boxes(w, h)
        elif mt in ("qwen2_vl", "qwen2_5_vl"):
            pp = hub_file(ck, "preprocessor_config.json")
            want = _qwen_boxes(w, h, pp["min_pixels"], pp["max_pixels"])
        elif mt in ("qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe"):  # 16-px patches (factor 32), "size"
            pp = hub_file(ck, "preprocessor_config.json")
            want = _qwen_boxes(w, h, pp["size"]["shortest_edge"], pp["size"]["longest_edge"], f=32)
        elif mt in ("llava_next", "llava_onevision"):
            cfg, pp = hub_file(ck, "config.json"), hub_file(ck, "preprocessor_config.json")
            side = cfg["vision_config"]["image_size"]
            ar = cfg.get("vision_aspect_ratio") if mt == "llava_onevision" else None
            items = _anyres_tokens(w, h, pp["image_grid_pinpoints"], side, side // cfg["vision_config"]["patch_size"],
                                   int(ar.replace("anyres_max_", "")) if ar else None)
            assert items[-1][0] != "resized"  # these small images keep their whole canvas
            assert n_in_ids == len(items) == int(sel.sum())
            assert [batch.kinds[j] for j in sel.nonzero().flatten().tolist()] == [k for k, _ in items]
            boxed = [b for _, b in items if b is not None]
            got = batch.tokens["box"][sel]
            assert torch.allclose(got[~torch.isnan(got).any(1)], torch.tensor(boxed, dtype=torch.float64), atol=1e-9)
            continue
        elif mt in ("glm4v", "glm4v_moe"):  # the Qwen rule, both temporal copies counted against the bounds
            pp = hub_file(ck, "preprocessor_config.json")
            want = _qwen_boxes(w, h, pp["size"]["shortest_edge"], pp["size"]["longest_edge"], t=2)
        elif mt == "gemma3":  # stretched to 896 x 896 (no aspect kept): 16 x 16 cells of the original image
            want = [(c * w / 16, r * h / 16, (c + 1) * w / 16, (r + 1) * h / 16) for r in range(16) for c in range(16)]
        elif mt == "gemma4":  # aspect kept: 3 x 3 pooled cells of the ORIGINAL image (_gemma4_grid)
            rows, cols = _gemma4_grid(w, h)
            want = [(c * w / cols, r * h / rows, (c + 1) * w / cols, (r + 1) * h / rows) for r in range(rows)
                    for c in range(cols)]
            assert (batch.grids[i]["rows"], batch.grids[i]["cols"]) == (rows, cols)
        elif mt in ("idefics3", "smolvlm"):  # 8 x 8 tokens per 512-px frame (patch 16, pixel shuffle 4)
            rows, cols, cw, ch = _idefics3_tiles(w, h)
            frames = rows * cols + 1
            assert n_in_ids == 64 * frames == int(sel.sum()) and batch.grids[i]["tiles"] == frames
            kinds = [batch.kinds[j] for j in sel.nonzero().flatten().tolist()]
            assert kinds == ["patch"] * (64 * (frames - 1)) + ["thumbnail"] * 64
            boxes = batch.tokens["box"][sel]
            assert torch.allclose(boxes[0], torch.tensor([0, 0, 64 * w / cw, 64 * h / ch], dtype=boxes.dtype))
            assert torch.allclose(boxes[-1], torch.tensor([w * 7 / 8, h * 7 / 8, w, h], dtype=boxes.dtype))
            continue
        elif mt == "mistral3":  # Pixtral: no downscale below 1540 px, each side rounded UP to 28 px (14-px patches,
            rows, cols = -(-h // 28), -(-w // 28)  # 2 x 2 merge), one token per 28 x 28 cell, raster order
            assert set(batch.tokens["kind"][sel].tolist()) == {0} and batch.grids[i] == {"rows": rows, "cols": cols,
                                                                                        "tiles": 1}
            want = [(c * w / cols, r * h / rows, (c + 1) * w / cols, (r + 1) * h / rows)
                    for r in range(rows) for c in range(cols)]
        else:
            cols, rows, tiles = _internvl_tiles(w, h)
            assert n_in_ids == 256 * tiles == int(sel.sum())
            assert batch.grids[i]["tiles"] == tiles
            boxes = batch.tokens["box"][sel]
            first = boxes[:256]  # tile 0 = the top-left tile of the cols x rows canvas, 16 x 16 tokens
            assert torch.allclose(first[-1], torch.tensor([w / cols * 15 / 16, h / rows * 15 / 16, w / cols,
                                                           h / rows], dtype=first.dtype))
            continue
        assert n_in_ids == len(want) == int(sel.sum())
        assert torch.allclose(batch.tokens["box"][sel], torch.tensor(want, dtype=torch.float64), atol=1e-9)


def _gemma4_grid(w, h, patch=16, k=3, budget=280):
    """Gemma 4's pooled grid (rows, cols) of a w x h image, by hand from the processor's documented rule: resized to
    the largest (H, W), multiples of k * patch px, aspect kept (floored), within budget * k^2 patches."""
    import math

    f = math.sqrt(budget * k * k * patch * patch / (w * h))
    side = k * patch
    return int(math.floor(f * h / side)), int(math.floor(f * w / side))


@pytest.mark.parametrize("ck", CKS)
def test_chat_template_survives_save_load_and_gives_the_real_layout(real_vlm, ck, tmp_path):
    vlm = real_vlm(ck)
    vlm.processor.save_pretrained(tmp_path)
    again = vlm.adapter.load_processor(str(tmp_path), vlm.adapter.config)
    assert again.chat_template == hub_file(ck, "chat_template.jinja")
    assert getattr(again, "image_seq_length", None) == getattr(vlm.processor, "image_seq_length", None)
    text = again.apply_chat_template(_messages(), add_generation_prompt=True)
    (w, h) = SIZES[0]
    ids = again(text=[text], images=[_images()[0]], return_tensors="pt")["input_ids"][0].tolist()
    mt = _mt(ck)
    if mt == "llava":
        assert ids[0] == 1 and ids.count(32000) == 576  # BOS <s> added by the LlamaTokenizer; <image> x 576
        start = ids.index(32000)
        assert ids[start:start + 576] == [32000] * 576
    elif mt in ("qwen2_vl", "qwen2_5_vl"):
        assert ids[0] == 151644  # <|im_start|>, no BOS
        s, e = ids.index(151652), ids.index(151653)  # <|vision_start|> <|image_pad|>* <|vision_end|>
        assert ids[s + 1:e] == [151655] * len(_qwen_boxes(w, h, 3136, 12845056))
    elif mt in ("qwen3_vl", "qwen3_vl_moe"):
        assert ids[0] == 151644  # <|im_start|>user: the Instruct template writes no default system turn
        s, e = ids.index(151652), ids.index(151653)
        assert ids[s + 1:e] == [151655] * len(_qwen_boxes(w, h, 65536, 16777216, f=32))
    elif mt in ("qwen3_5", "qwen3_5_moe"):  # the Qwen3 specials after 248044 entries: <|im_start|> 248045
        assert ids[0] == 248045
        s, e = ids.index(248053), ids.index(248054)  # <|vision_start|> <|image_pad|> 248056 * n <|vision_end|>
        assert ids[s + 1:e] == [248056] * len(_qwen_boxes(w, h, 65536, 16777216, f=32))
    elif mt in ("llava_next", "llava_onevision"):
        cfg = hub_file(ck, "config.json")
        side = cfg["vision_config"]["image_size"]
        n = len(_anyres_tokens(w, h, hub_file(ck, "preprocessor_config.json")["image_grid_pinpoints"], side,
                               side // cfg["vision_config"]["patch_size"]))
        image_id = cfg["image_token_index"]
        assert ids[0] == (1 if mt == "llava_next" else 151644)  # Mistral: BOS <s> then "[INST]"; Qwen2: <|im_start|>
        start = ids.index(image_id)
        assert ids.count(image_id) == n and ids[start:start + n] == [image_id] * n
    elif mt == "gemma3":  # the template's <bos> (the processor adds one more, as on the hub); <start_of_image>,
        assert ids[0] == 2  # 256 x <image_soft_token> 262144, <end_of_image>
        s = ids.index(255999)
        assert ids[s + 1:s + 257] == [262144] * 256 and ids[s + 257] == 256000 and ids.count(262144) == 256
    elif mt in ("glm4v", "glm4v_moe"):  # [gMASK] <sop> <|user|>; <|begin_of_image|> <|image|>* <|end_of_image|>
        image_id = hub_file(ck, "config.json")["image_token_id"]
        assert ids[:3] == [151331, 151333, 151336]
        s, e = ids.index(151339), ids.index(151340)
        assert ids[s + 1:e] == [image_id] * len(_qwen_boxes(w, h, 12544, 9633792, t=2)) == [image_id] * ids.count(
            image_id)
    elif mt == "gemma4":  # the template's <bos> (the processor adds one more), <|turn> 105; <|image> 255999, one
        rows, cols = _gemma4_grid(w, h)  # <|image|> 258880 per pooled cell, <image|> 258882
        n = rows * cols
        assert ids[0] == 2 and 105 in ids[:3]
        s = ids.index(255999)
        assert ids[s + 1:s + 1 + n] == [258880] * n and ids[s + 1 + n] == 258882 and ids.count(258880) == n
    elif mt in ("idefics3", "smolvlm"):  # <|im_start|>User:, then per tile <fake><row_i_col_j> + 64 <image>
        rows, cols, _, _ = _idefics3_tiles(w, h)
        assert ids[0] == 1 and ids.count(49190) == 64 * (rows * cols + 1)
        s = ids.index(49190)
        assert ids[s - 2:s] == [49189, 49153] and ids[s:s + 64] == [49190] * 64
        g = ids.index(49152)  # <global-img>: the global image's 64 tokens, closed by <fake_token_around_image>
        assert ids[g - 1] == 49189 and ids[g + 1:g + 65] == [49190] * 64 and ids[g + 65] == 49189
    elif mt == "mistral3":  # <s>[SYSTEM_PROMPT]...[/SYSTEM_PROMPT][INST]: rows of [IMG] 10 closed by [IMG_BREAK] 12,
        rows, cols = -(-h // 28), -(-w // 28)  # the last one by [IMG_END] 13 (text tokens, not in the mask)
        assert ids[0] == 1 and 17 in ids[:3] and ids.count(10) == rows * cols
        s = ids.index(10)
        layout = ([10] * cols + [12]) * (rows - 1) + [10] * cols + [13]
        assert ids[s - 1] == 3 and ids[s:s + rows * (cols + 1)] == layout
    else:
        assert ids[0] == 151644
        tiles = _internvl_tiles(w, h)[2]
        s = ids.index(151665)  # <img> <IMG_CONTEXT> x 256 * tiles </img>
        assert ids[s + 1:s + 1 + 256 * tiles] == [151667] * (256 * tiles) and ids[s + 1 + 256 * tiles] == 151666


def test_internvl_processor_with_the_video_token_past_the_vocab_is_accepted_and_a_foreign_one_refused(real_vlm):
    vlm = real_vlm("OpenGVLab/InternVL3-1B-hf")
    vocab = vlm.adapter.config.get_text_config().vocab_size
    assert len(vlm.tokenizer) == vocab + 1  # transformers 5 added <video>, as on the hub checkpoint
    assert vlm.tokenizer.convert_tokens_to_ids("<video>") == vocab
    other = real_vlm("Qwen/Qwen2-VL-2B-Instruct")  # another checkpoint's processor (image id differs)
    with pytest.raises(mv.InputError, match="does not match"):
        vlm.adapter.check_processor(other.processor)
    import copy

    tok = copy.deepcopy(vlm.processor)
    tok.tokenizer.add_tokens(["<not_in_the_model>"])  # a second token past the vocabulary: not this checkpoint
    with pytest.raises(mv.InputError, match="past the end"):
        vlm.adapter.check_processor(tok)


@pytest.mark.parametrize("ck", ["llava-hf/llava-1.5-7b-hf", "Qwen/Qwen2.5-VL-7B-Instruct", "OpenGVLab/InternVL3-1B-hf"])
def test_probes_interventions_generate_and_remote_run(real_vlm, ck):
    import torch.nn.functional as F

    from intervention_refs import clean_lm_kwargs, nn_run
    from mech_vtokens.interventions import Prune, resolve
    from mech_vtokens.interventions.zero_sublayer import ZeroSublayer
    from mech_vtokens.partition import calibrate
    from mech_vtokens.probes.embed_lens import EmbedLens
    from mech_vtokens.probes.logit_lens import LogitLens
    from mech_vtokens.probes.norm_tracker import NormTracker
    from mech_vtokens.probes.sink_channels import SinkChannels
    from test_interventions import prune_reference

    vlm = real_vlm(ck)
    img, prompt = T.image(112, seed=0), vlm.prompt("what color is the object?")  # square: InternVL 1 tile
    probes = [EmbedLens(k=3), LogitLens(k=3), NormTracker(), SinkChannels()]
    res = mv.run(vlm, [img], [prompt], probes=probes)
    lens = res["embed_lens"].to_pandas()
    assert len(lens) > 0
    # EmbedLens at hook_embed == plain-torch fp32 cosine top-k over the rows a token maps to, from HF's own forward
    batch = vlm.prepare([img], [prompt])
    with torch.no_grad():
        h0 = vlm.hf(**batch.inputs, output_hidden_states=True).hidden_states[0][batch.visual_mask].float()
    W = vlm.hf.get_input_embeddings().weight[:len(vlm.tokenizer)].float()
    want = (F.normalize(h0, dim=1) @ F.normalize(W, dim=1).T).topk(3, dim=1).indices
    assert torch.equal(res["embed_lens"].ids["hook_embed"], want)
    local = mv.run(vlm, [img], [prompt], probes=[EmbedLens(k=3)], remote="local")
    assert local["embed_lens"].to_pandas().equals(res["embed_lens"].to_pandas())
    # Prune(all visual): the logits of a hand-built LM forward without those columns (model dtype: its rounding)
    sel = resolve(Prune("all").tokens, batch)
    logits, _ = nn_run(vlm, batch, [Prune("all")])
    (ref, real, _), = prune_reference(vlm, batch, sel, clean_lm_kwargs(vlm, batch))
    assert logits.shape[1] == batch.visual_mask.shape[1] - batch.n_visual == ref.shape[0]
    tol = 4 * torch.finfo(ref.dtype).eps * float(ref.abs().max())
    assert float((logits[0][real] - ref[real]).abs().max()) <= tol
    mv.run(vlm, [img], [prompt], probes=[LogitLens(k=3)], interventions=[ZeroSublayer("all", layers=0)])
    out = mv.generate(vlm, [img], [prompt], max_new_tokens=2)
    assert len(out.text) == 1
    # the partition calibrates on a few images and puts every visual token in one group
    cal = [T.image(112, seed=s) for s in range(3)]
    part = calibrate(vlm, cal, [prompt] * 3)
    got = part.classify([img], [prompt])
    assert len(got.codes) == batch.n_visual and bool(((got.codes >= 0) & (got.codes < 4)).all())


def test_cli_analyze_on_a_real_fixture_dir(real_vlm, tmp_path, monkeypatch):
    import pandas as pd

    import mech_vtokens.cli as cli
    import mech_vtokens.suite as suite

    ck = "Qwen/Qwen2-VL-2B-Instruct"
    vlm = real_vlm(ck)
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i, s in enumerate(SIZES):
        T.image(112, seed=i).resize(s).save(imgs / f"{i}.png")
    seen = []
    original = suite.analyze  # cli imports it from the suite at call time
    monkeypatch.setattr(suite, "analyze", lambda v, images, prompts, **kw: seen.append(prompts) or original(
        v, images, prompts, **kw))
    out = tmp_path / "out"
    assert cli.main(["analyze", "--model", str(vlm.source), "--images", str(imgs), "--probes", "embed_lens,norms",
                     "--out", str(out), "--k", "2", "--question", "what color is it?"]) == 0
    # the prompt is the chat template's (system turn, vision span, assistant turn opened)
    assert seen[0] == [vlm.processor.apply_chat_template(_messages(text="what color is it?"),
                                                         add_generation_prompt=True)] * 2
    assert (out / "report.html").exists()
    df = pd.read_csv(out / "embed_lens.csv")
    n_vis = sum(len(_qwen_boxes(w, h, 3136, 12845056)) for w, h in SIZES)
    assert sorted(df.image.unique()) == [0, 1] and len(df[(df.site == "hook_embed")]) == n_vis * 2


# ---- call-time processor settings: the geometry follows what the processor applies in THIS call ------------------
CALL_SIZES = [(300, 110), (90, 200)]


@pytest.mark.parametrize("kw", [dict(max_patches=12), dict(max_patches=2), dict(max_patches=6, min_patches=3)])
def test_internvl_call_time_max_patches_follows_the_tiling_rule(real_vlm, kw):
    vlm = real_vlm("OpenGVLab/InternVL3-1B-hf")
    imgs = [T.image(112, seed=i).resize(s) for i, s in enumerate(CALL_SIZES)]
    batch = vlm.prepare(imgs, [vlm.prompt("what color is the object?")] * 2, **kw)
    for i, (w, h) in enumerate(CALL_SIZES):
        cols, rows, tiles = _internvl_tiles(w, h, max_num=kw["max_patches"], min_num=kw.get("min_patches", 1))
        g = batch.grids[i]
        assert (g["tile_cols"], g["tile_rows"], g["tiles"]) == (cols, rows, tiles)
        assert int(batch.visual_mask[i].sum()) == 256 * tiles == int((batch.tokens["image"] == i).sum())


@pytest.mark.parametrize("ck", ["Qwen/Qwen2-VL-2B-Instruct", "Qwen/Qwen2.5-VL-3B-Instruct"])
@pytest.mark.parametrize("kw", [dict(max_pixels=6272), dict(min_pixels=62720), dict(min_pixels=3136, max_pixels=3136)])
def test_qwen_call_time_pixels_follow_smart_resize(real_vlm, ck, kw):
    vlm = real_vlm(ck)
    pp = hub_file(ck, "preprocessor_config.json")
    imgs = [T.image(112, seed=i).resize(s) for i, s in enumerate(CALL_SIZES)]
    batch = vlm.prepare(imgs, [vlm.prompt("what color is the object?")] * 2, **kw)
    for i, (w, h) in enumerate(CALL_SIZES):
        want = _qwen_boxes(w, h, kw.get("min_pixels", pp["min_pixels"]), kw.get("max_pixels", pp["max_pixels"]))
        sel = batch.tokens["image"] == i
        assert int(batch.visual_mask[i].sum()) == len(want) == int(sel.sum())
        assert torch.allclose(batch.tokens["box"][sel], torch.tensor(want, dtype=torch.float64), atol=1e-9)
