"""Views: offline circuitsvis wrappers, the patch-grid overlay (geometry per family), the report in a real browser."""

import shutil
import socket
import warnings

import numpy as np
import pytest
import torch

import mech_vtokens as mv
from mech_vtokens import testing as T
from mech_vtokens.errors import InputError
from mech_vtokens.views import GROUP_COLORS, PatchOverlay, Report, TopWords, View, attention, token_values
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
    # the overlay's group colours are the palette every matplotlib plot uses
    assert {c["group"]: c["color"] for c in data["cells"]} == {g: GROUP_COLORS[g] for g in ("dead", "alive", "sink")}
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
    rep.view(TopWords(e, 0)).view(token_values([f"t{i}" for i in range(6)], np.arange(6), "values"))
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
    assert html.count("CircuitsVis.render(") == 2
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
        cells = page.locator(".mvt-overlay .color-stage .cell")
        # one cell per visual token of the shown tile (LLaVA: the whole 6x6 grid)
        assert cells.count() == grid["rows"] * grid["cols"]
        cells.nth(7).hover()
        info = page.locator(".mvt-overlay .info").inner_text()
        assert "EmbedLens top-k" in info and "LogitLens top-k" in info and "token " in info
        assert page.locator(".layer-slider").count() == 0  # one layer-independent colouring: no slider
        if grid["tiles"] > 1:  # InternVL: switch to the thumbnail
            page.locator(".tile-select").select_option(index=grid["tiles"] - 1)
            assert page.locator(".mvt-overlay .color-stage .cell").count() == grid["rows"] * grid["cols"]
        for i in range(page.locator(".mvt-cv").count()):  # every circuitsvis view rendered something
            assert len(page.locator(".mvt-cv").nth(i).inner_html()) > 50
        browser.close()
    assert errors == []
    assert [u for u in requests if not u.startswith(("file:", "data:"))] == [], requests


# ---------------------------------------------------------------------------------------------------------------
# The suite's report, as a researcher opens it (issue 16)
# ---------------------------------------------------------------------------------------------------------------

_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--disable-quic"]


@pytest.fixture(scope="module")
def suite_report(tiny_vlm, tmp_path_factory):
    """analyze() on 6 images in batches of 4 (so a second batch exists), with the planted reference."""
    from mech_vtokens.suite import analyze

    vlm = tiny_vlm("llava")
    imgs = [T.image(112, seed=s) for s in range(6)]
    prompts = [T.prompt("llava")] * 6
    out = tmp_path_factory.mktemp("suite_report")
    with warnings.catch_warnings():  # the tiny model's thresholds: stated in the report
        warnings.simplefilter("ignore")
        results, path = analyze(vlm, imgs, prompts, probes=["embed_lens", "logit_lens", "norms", "partition"],
                                k=3, batch_size=4, out=out, progress=False, planted=True)
    return vlm, results, path


def test_suite_report_files_and_forward_count(suite_report):
    import json

    vlm, results, path = suite_report
    total = json.loads((path.parent / "forwards.json").read_text())["forwards"]
    phases = json.loads((path.parent / "forwards_by_phase.json").read_text())
    planted = phases.pop("planted fixture (another model)")
    # calibration 2 batches + summary 2 + clusters 2 + the probes 2 (the partition alone: no threshold pass)
    assert phases["every probe, one forward per batch"] == 2 and planted > 0
    assert total == sum(phases.values()) == 8
    html = path.read_text()
    assert "; 8 forwards in all." in html and "one forward per batch for every probe" not in html
    name = html.split("<h1>")[1].split("</h1>")[0].split("— ")[1]  # the model, never its absolute path
    assert not name.startswith("/") and name.count("/") <= 1, name
    pngs = sorted((path.parent / "report_figures").glob("*.png"))
    assert len(pngs) == html.count("<figure data-file=") >= 3
    assert {p.name for p in pngs} == set(__import__("re").findall(r"<figure data-file='([^']+)'", html))


@pytest.mark.skipif(_chromium() is None, reason="no Chromium on this machine (scripts/test.sh installs it)")
def test_suite_report_in_headless_chromium(suite_report):
    """Sections and contents, every image, the top-k words following the Site selector, the colour bar, the
    layer slider recolouring, a hover with every layer, planted colours = the palette, no network request."""
    pw = pytest.importorskip("playwright.sync_api", reason="playwright is a test extra")
    vlm, results, path = suite_report
    norms = [r.to_pandas() for r in results["norms"]]
    lens = results["embed_lens"][0].to_pandas()
    with pw.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), args=_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        requests, errors = [], []
        page.on("request", lambda r: requests.append(r.url))
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(path.as_uri())
        page.wait_for_timeout(500)
        # sections: every heading is in the table of contents, in order, and links to it
        heads = page.locator("h2.mvt-section").all_inner_texts()
        toc = page.locator(".mvt-toc a").all_inner_texts()
        assert heads == toc and len(heads) >= 6
        assert any("planted" in h.lower() for h in heads)
        for a in page.locator(".mvt-toc a").all():
            assert page.locator(a.get_attribute("href")).count() == 1
        # every image appears in the patch viewer (two batches: 4 + 2 panels), untinted beside its colouring
        viewer = page.locator(".mvt-overlay").filter(has=page.locator(".colorbar"))
        assert viewer.count() == 2
        names = viewer.locator(".panel .caption b").all_inner_texts()
        assert names == [f"image {i}" for i in range(6)]
        assert viewer.locator(".image-stage").count() == 6
        bg = page.evaluate("[...document.querySelectorAll('.image-stage .cell')].map(e=>getComputedStyle(e)"
                           ".backgroundColor)")
        assert set(bg) == {"rgba(0, 0, 0, 0)"}  # nothing painted over the image
        # the colour bar: a gradient, ticks at this layer's L2 range over the batch's images (plain pandas)
        first = viewer.nth(0)
        bar = first.locator(".colorbar")
        assert "linear-gradient" in bar.evaluate("e=>getComputedStyle(e).backgroundImage")
        last_site = first.locator(".site-name").inner_text().strip()
        df = norms[0]
        want = df[(df.site == last_site) & (df.visual_index >= 0)].l2
        ticks = [float(t) for t in first.locator(".colorbar-ticks span").all_inner_texts()]
        assert ticks[0] == pytest.approx(want.min(), rel=5e-3) and ticks[-1] == pytest.approx(want.max(), rel=5e-3)
        # the slider recolours (the colouring is layer-dependent) and moves the colour bar
        cell = first.locator(".color-stage .cell").nth(5)
        before = cell.evaluate("e=>e.style.background")
        first.locator(".layer-slider").fill("0")
        assert first.locator(".site-name").inner_text().strip() == "hook_embed"
        assert cell.evaluate("e=>e.style.background") != before
        want0 = df[(df.site == "hook_embed") & (df.visual_index >= 0)].l2
        ticks0 = [float(t) for t in first.locator(".colorbar-ticks span").all_inner_texts()]
        assert ticks0[-1] == pytest.approx(want0.max(), rel=5e-3)
        # hover: every layer's top-k words of THIS token (the table's own words), and the prompt's text tokens
        cell.hover()
        info = first.locator(".info")
        rows = info.locator(".layer-row").all_inner_texts()
        sites = [s for s in results["embed_lens"][0].ids if s != "vision_projector.hook_out"]
        assert [r.split("\t")[0] for r in rows] == sites
        tok = int(cell.get_attribute("data-token"))
        for s, r in zip(sites, rows):
            top = lens[(lens.site == s) & (lens.visual_index == tok) & (lens["rank"] == 0)].token.iloc[0]
            if top.strip() and top.strip() not in ("</s>", "<s>", "<unk>", "?", "."):
                assert top in r, (s, top, r)
        assert "what" in info.locator(".prompt-tokens").inner_text()
        # the top-k widget: its words follow the Site selector (and equal the table's top words)
        tw = page.locator(".mvt-topwords").first
        sel = tw.locator(".site-select")
        words = {}
        for s in ("hook_embed", sites[-1]):
            sel.select_option(s)
            words[s] = tw.locator("tbody tr").first.locator("td.word").all_inner_texts()
        assert words["hook_embed"] != words[sites[-1]]
        # planted reference: its groups in the palette's colours
        planted = page.locator(".mvt-overlay").filter(has_text="planted fixture")
        cols = planted.first.evaluate("r=>[...r.querySelectorAll('.color-stage .cell')].map(e=>e.style.background)")
        from matplotlib.colors import to_rgb

        palette = {"rgb({}, {}, {})".format(*(round(255 * x) for x in to_rgb(GROUP_COLORS[g])))
                   for g in ("vit_sink", "llm_sink", "dead", "alive")}
        assert set(cols) == palette
        browser.close()
    assert errors == []
    assert [u for u in requests if not u.startswith(("file:", "data:"))] == [], requests


def test_topwords_follow_the_site_and_skip_special(tiny_vlm, tmp_path):
    """TopWords' word lists are the lens table's top-k words of each visual token at the chosen site (checked
    against the table, per site); skip_special hides special / punctuation-only words."""
    vlm = tiny_vlm("llava")
    imgs = [T.image(112, seed=4)]
    e = mv.run(vlm, imgs, [T.prompt("llava")], probes=[EmbedLens(k=4)])["embed_lens"]
    df = e.to_pandas()
    raw = TopWords(e, 0, skip_special=False).data()
    for s in raw["sites"]:
        for i, row in enumerate(raw["tops"][s]):
            want = df[(df.site == s) & (df.visual_index == i)].sort_values("rank").token.tolist()
            assert [raw["words"][w] for w, _ in row] == want
    kept = TopWords(e, 0).data()
    n_all = sum(len(r) for s in raw["sites"] for r in raw["tops"][s])
    n_kept = sum(e is not None for s in kept["sites"] for r in kept["tops"][s] for e in r)
    assert n_all - n_kept == kept["hidden"] > 0
    for s in kept["sites"]:  # a hidden word keeps its rank's column; the others are the raw ones
        for r_raw, r_kept in zip(raw["tops"][s], kept["tops"][s]):
            assert len(r_raw) == len(r_kept)
            assert all(k is None or raw["words"][a[0]] == kept["words"][k[0]] for a, k in zip(r_raw, r_kept))
    from mech_vtokens.views.topk import hidden_word

    assert hidden_word("?", False) and hidden_word(" ", False) and hidden_word("cat", True)
    assert not hidden_word("cat", False)
    assert all(not hidden_word(kept["words"][e[0]], False) for s in kept["sites"] for r in kept["tops"][s]
               for e in r if e is not None)
    with pytest.raises(InputError, match="image 3 has no visual tokens"):
        TopWords(e, 3)
