"""Views: offline circuitsvis wrappers, the patch-grid overlay (geometry per family), the report in a real browser."""

import shutil
import socket

import numpy as np
import pytest
import torch

import mech_vtokens as mv
from mech_vtokens import testing as T
from mech_vtokens.errors import InputError
from mech_vtokens.views import PatchOverlay, Report, View, attention, lens_topk, token_values
from mech_vtokens.probes import EmbedLens, LogitLens
from mech_vtokens.probes.activations import Activations

FAMILIES = T.FAMILIES


def _marked(img, box):
    from PIL import Image

    a = np.array(img)
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    a[y0:y1, x0:x1] = [255, 0, 255]
    return Image.fromarray(a)


@pytest.mark.parametrize("family", FAMILIES)
def test_overlay_cell_holds_the_marker(tiny_vlm, family):
    """A marker drawn in the image lands in the overlay cell of the token whose LM input changes most."""
    vlm = tiny_vlm(family)
    img = T.image(112, seed=3).resize((170, 120))
    prompts = [T.prompt(family)]
    clean = vlm.prepare([img], prompts)
    # a marker at a fixed spot of the ORIGINAL image (not derived from the geometry under test)
    cx, cy = 0.71 * img.width, 0.36 * img.height
    hw = 3
    marked_img = _marked(img, (cx - hw, cy - hw, cx + hw, cy + hw))
    a = mv.run(vlm, [img], prompts, probes=[Activations(["hook_embed"], visual_only=True)])["activations"]
    b = mv.run(vlm, [marked_img], prompts, probes=[Activations(["hook_embed"], visual_only=True)])["activations"]
    change = (a["hook_embed"] - b["hook_embed"]).float().norm(dim=-1)
    data = PatchOverlay(clean, 0).data()
    first_tile = [c for c in data["cells"] if c["tile"] in (-1, 0)]
    hit = max(first_tile, key=lambda c: float(change[c["i"]]))
    x0, y0, x1, y1 = hit["box"]
    u, v = cx / img.width, cy / img.height
    if data["grid"].get("tiles", 1) > 1:  # InternVL: the first tile covers only part of the image
        assert data["grid"]["tile_cols"] * data["grid"]["tile_rows"] + 1 == data["grid"]["tiles"]
    if family in ("internvl", "idefics3", "smolvlm") and not (x0 <= u <= x1):  # in another tile: check that one
        cells = [c for c in data["cells"] if c["tile"] != data["tiles"][-1] or data["grid"]["tiles"] == 1]
        hit = max(cells, key=lambda c: float(change[c["i"]]))
        x0, y0, x1, y1 = hit["box"]
    assert x0 <= u <= x1 and y0 <= v <= y1, (family, hit, (u, v))
    # one cell per visual token with a region (LLaVA-NeXT / OneVision newline tokens have none)
    assert len(data["cells"]) == clean.n_visual - clean.kinds.count("newline")
    assert all(c["kind"] != "newline" for c in data["cells"])


def test_overlay_groups_legend_and_bad_input(tiny_vlm):
    vlm = tiny_vlm("llava")
    batch = vlm.prepare([T.image()], [T.prompt("llava")])
    groups = ["dead"] * 30 + ["alive"] * 5 + ["sink"]
    data = PatchOverlay(batch, 0, groups=groups).data()
    assert {e["label"] for e in data["legend"]} == {"alive (5)", "dead (30)", "sink (1)"}
    assert [c["group"] for c in data["cells"]] == groups
    with pytest.raises(InputError, match="3 values for 36 visual tokens"):
        PatchOverlay(batch, 0, values=[1, 2, 3])
    with pytest.raises(InputError, match="image 4 is out of range"):
        PatchOverlay(batch, 4)
    with pytest.raises(InputError, match="one value per token"):
        token_values(["a", "b"], [1.0])


def _report(vlm, family):
    imgs = [T.image(112, seed=1).resize((200, 140)), T.image(112, seed=2)]
    prompts = [T.prompt(family), T.prompt(family, "what shape ?")]
    batch = vlm.prepare(imgs, prompts)
    res = mv.run(vlm, imgs, prompts, probes=[EmbedLens(k=3), LogitLens(k=3)])
    e, lg = res["embed_lens"], res["logit_lens"]
    norms = torch.arange(batch.n_visual, dtype=torch.float)
    rep = Report(f"report {family}")
    rep.heading("overlay").view(PatchOverlay(batch, 0, values=norms, lenses=[e, lg], title="norms"))
    rep.view(lens_topk(e, 0)).view(token_values([f"t{i}" for i in range(6)], np.arange(6), "values"))
    rep.view(attention(torch.softmax(torch.randn(2, 5, 5), -1), list("abcde"), "attention"))
    rep.table(e.to_pandas(), "EmbedLens")
    return rep, batch


def test_views_and_report_open_no_socket(tiny_vlm, monkeypatch, tmp_path):
    vlm = tiny_vlm("qwen2_5_vl")

    def refuse(*a, **k):
        raise AssertionError("a view opened a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    rep, _ = _report(vlm, "qwen2_5_vl")
    path = rep.save(tmp_path / "r.html")
    html = path.read_text()
    assert "unpkg.com" not in html and "cdn" not in html.lower().replace("cdn/iife", "")
    assert html.count("CircuitsVis.render(") == 3
    v = View("ColoredTokens", tokens=["a"], values=[1.0])
    assert v._repr_html_().startswith("<script>")


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


@pytest.mark.skipif(_chromium() is None, reason="no Chromium on this machine (scripts/test.sh installs it)")
@pytest.mark.parametrize("family", ["llava", "internvl"])
def test_report_in_headless_chromium(tiny_vlm, tmp_path, family):
    pw = pytest.importorskip("playwright.sync_api", reason="playwright is a test extra")
    vlm = tiny_vlm(family)
    rep, batch = _report(vlm, family)
    path = rep.save(tmp_path / "report.html")
    grid = batch.grids[0]
    with pw.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run", "--disable-quic"])
        page = browser.new_page()
        requests, errors = [], []
        page.on("request", lambda r: requests.append(r.url))
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(path.as_uri())
        page.wait_for_timeout(800)
        cells = page.locator(".mvt-overlay .cell")
        # one cell per visual token of the shown tile (LLaVA: the whole 6x6 grid)
        assert cells.count() == grid["rows"] * grid["cols"]
        cells.nth(7).hover()
        info = page.locator(".mvt-overlay .info").inner_text()
        assert "EmbedLens @ " in info and "LogitLens @ " in info and "token " in info
        page.locator(".layer-slider").fill("0")
        cells.nth(7).hover()
        assert "@ hook_embed" in page.locator(".mvt-overlay .info").inner_text()
        if grid["tiles"] > 1:  # InternVL: switch to the thumbnail
            page.locator(".tile-select").select_option(index=grid["tiles"] - 1)
            assert page.locator(".mvt-overlay .cell").count() == grid["rows"] * grid["cols"]
        for i in range(page.locator(".mvt-cv").count()):  # every circuitsvis view rendered something
            assert len(page.locator(".mvt-cv").nth(i).inner_html()) > 50
        browser.close()
    assert errors == []
    assert [u for u in requests if not u.startswith(("file:", "data:"))] == [], requests
