"""Writes AND executes the notebooks of this folder from the cell lists below (so they stay reviewable as code).

    python notebooks/build.py                      # regenerate and execute every .ipynb here (~1.5 min, 2 cores)
    python notebooks/build.py 01_quickstart.ipynb  # only these

Every notebook takes MODEL (hub id or local directory) in its first cell and defaults to the embedded offline model.
One entry of ``NOTEBOOKS`` per notebook: a list of ("md" | "code", source) cells; prose cells state what to look at
and what it means, with the numbers the cell above prints.

Execution: a fresh python3 kernel per notebook (nbclient), cwd = this folder, this checkout first on the path,
Jupyter's inline matplotlib backend (so every ``.plot()`` shows a PNG), PYTHONHASHSEED=0; everything random in the
cells is seeded, so a rebuild on the same machine writes the same files. What is saved: every output, minus the
progress-bar widgets (tqdm.auto draws ipywidgets; their ids are random and a static page cannot show them) and
per-run metadata (timings, the kernel's Python version); adjacent prints to one stream are one output (the kernel's
chunking depends on timing); text outputs are scrubbed of what differs between machines
and runs (:func:`scrub`: this checkout's path, temporary folders, object addresses, the views' random element ids).

How ``tests/test_notebooks.py`` compares a fresh execution with the committed files: code and markdown cells exactly;
per code cell the same outputs (type, stream name, MIME types); stdout and ``text/plain`` text with equal words and
numbers equal to ``2e-3 + 1e-3 * |x|`` (another machine's float rounding); images and HTML by presence only (their
bytes depend on matplotlib's version, the fonts, the browser-side code); no error, nothing on stderr (no warning, no
text progress bar), and one PNG per ``.plot(`` call of a cell. The notebooks are built on the default model: after a
change to the library, the plots or the model, run this script and commit the notebooks.
"""

import os
import re
import sys
import tempfile
import time
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WIDGET = "application/vnd.jupyter.widget-view+json"

SETUP = '''MODEL = None  # a hub id (e.g. "llava-hf/llava-1.5-7b-hf") or a local directory; None = the embedded default
import mech_vtokens as mv
from mech_vtokens.defaults import default_model, demo_inputs

path, what = (MODEL, MODEL) if MODEL else default_model()
print("model:", what)
vlm = mv.load(path)
vlm'''

NOTEBOOKS = {
    "01_quickstart.ipynb": [
        ("md", "# Quickstart: EmbedLens on one image\n\nLoad a model, read its visual tokens with **EmbedLens** "
               "(cosine top-k against the *input* embedding matrix, paper Sec. 3) next to **LogitLens** (final norm + "
               "unembedding), in one forward, and look at them on the image."),
        ("code", SETUP),
        ("code", "images, questions, objects = demo_inputs(2)\n"
                 "# vlm.prompt: the checkpoint's chat template, "
                 "one whole image span per image (plain format without one)\n"
                 "prompts = [vlm.prompt(q) for q in questions]\n"
                 "print(questions, objects, prompts[0])\nimages[0].resize((192, 192))"),
        ("code", "from mech_vtokens.probes import EmbedLens, LogitLens\n\n"
                 "embed = EmbedLens(k=5)\n"
                 "res = mv.run(vlm, images, prompts, probes=[embed, LogitLens(k=5)])\n"
                 "res  # a Results: every probe's result, keyed by name (res['embed_lens']) or object (res[embed])"),
        ("code", "embed, logit = res['embed_lens'], res['logit_lens']\nembed.to_pandas().head(10)"),
        ("md", "Most frequent top-1 token per site, for both lenses (`res.to_pandas()` concatenates their tables, "
               "which have one shape, with a `result` column):"),
        ("code", "df = res.to_pandas()\n"
                 "top1 = df[df['rank'] == 0].groupby(['lens', 'site'], observed=True)['token']"
                 ".agg(lambda s: s.value_counts().index[0])\n"
                 "top1.unstack(0)"),
        ("md", "**What the lens reads.** Both scenes are synthetic, so we know what is in them. The cell below "
               "asks, per site, which share of the visual tokens have the image's *background colour* among their "
               "EmbedLens top-5 words:"),
        ("code", "from mech_vtokens.defaults import demo_qa\n\n"
                 "_, _, background = demo_qa(len(images), kinds=('background',))  # the scenes' ground truth\n"
                 "top5 = embed.to_pandas()\n"
                 "top5['truth'] = top5.image.map(dict(enumerate(background)))\n"
                 "hit = (top5.token == top5.truth).groupby([top5.site, top5.image, top5.visual_index], "
                 "observed=True).any()\n"
                 "print('backgrounds:', background)\n"
                 "hit.groupby(level='site', observed=True).mean().round(2).rename('background colour in top-5')"),
        ("md", "**Finding: at the LM input the visual tokens are words for what they show.** 71 % of the visual "
               "tokens have their image's background colour (white, black) among their five nearest *input* "
               "embeddings at `hook_embed` — EmbedLens' reading (paper Sec. 3): the projector writes visual tokens "
               "next to the vocabulary's own embeddings. The share falls to 15–38 % inside the blocks, where the "
               "residual stream leaves the input-embedding space; there LogitLens' top-1 (the table above) turns "
               "to answer-side words ('written', 'bottom')."),
        ("md", "**How loud the visual tokens are.** `NormTracker` reads the L2 norm of every token at every LM "
               "site (one more forward); the median per group and site:"),
        ("code", "from mech_vtokens.probes import NormTracker\n\n"
                 "norms = mv.run(vlm, images, prompts, probes=[NormTracker(vision=False)])['norm_tracker']"
                 ".to_pandas()\n"
                 "med = norms.groupby(['site', 'group'], observed=True).l2.median().unstack()\n"
                 "med['visual / text'] = med['visual'] / med['text']\nmed.round(2)"),
        ("md", "**Finding: the visual tokens are loud.** They enter the LM with a median L2 norm of 8.7 against "
               "0.46 for the text tokens — 19× — and the text tokens only catch up layer by layer (0.97× after the "
               "last block). This is the paper's Sec. 5.2 observation (Fig. 8, top) on a 4-layer model: the "
               "projector hands the LM high-norm visual tokens that the shallow layers change little (the relative "
               "update of a large vector is small)."),
        ("md", "The patch-grid overlay: hover a patch to see its top-k tokens at the layer of the slider."),
        ("code", "from mech_vtokens.views import PatchOverlay\n\nbatch = vlm.prepare(images, prompts)\n"
                 "PatchOverlay(batch, 0, lenses=[embed, logit], title='image 0')"),
        ("md", "The same top-1 tokens as a matplotlib figure (`.plot()` returns the Figure):"),
        ("code", "embed.plot(image=0)"),
    ],
    "02_sink_dead_alive.ipynb": [
        ("md", "# Sink, dead and alive visual tokens\n\nPaper Secs. 2, 4–6 and App. B: calibrate a partition on a "
               "set of images (statistical rule: ViT sinks by vision-layer norm, LLM sinks by the BOS sink-channel "
               "ratio φ, dead = the dominant cross-image-stable cluster far from the text embeddings, alive = the "
               "rest), classify new images inside the trace, look at the groups, and prune dead tokens vs a matched "
               "random set.\n\nPart A runs on `MODEL` (the embedded default unless you set one). Part B runs on a "
               "*planted* fixture whose partition is known by construction, so you can see what the analyses report "
               "when the structure is there."),
        ("code", SETUP.replace("vlm = mv.load(path)",
                               "vlm = mv.load(path, attn_implementation='eager')"
                               "  # eager: attention weights for the dynamics")),
        ("md", "## A. Your model"),
        ("md", "First ask the data whether anything stands out: `sink_thresholds` measures, on 20 images, the "
               "sink-channel ratio φ of the BOS token against the visual tokens' (φ ≤ √d for any vector) and the "
               "ViT's largest visual-token norm against its median."),
        ("code", "from mech_vtokens.partition import GroupDynamics, calibrate, sink_thresholds, summarize\n\n"
                 "images, questions, _ = demo_inputs(28)\nprompts = [vlm.prompt(q) for q in questions]\n"
                 "t = sink_thresholds(vlm, images[:20], prompts[:20])\n"
                 "print(f\"phi: BOS {t['phi_bos']:.2f}, visual median {t['phi_visual_median']:.2f}, bound sqrt(d) = "
                 "{t['phi_bound']:.1f} -> threshold {t['phi']}\")\n"
                 "print(f\"ViT L2: max {t['vit_max']:.1f}, median {t['vit_median']:.1f} "
                 "({t['vit_max'] / t['vit_median']:.1f}x) -> threshold {t['vit']}\")"),
        ("md", "**Finding: this model has no sinks.** The BOS token's sink-channel ratio φ (2.40) is *below* the "
               "visual tokens' median (3.05), and the ViT's largest visual-token norm is only 2.4× its median "
               "(real ViT sinks stand out by an order of magnitude). `sink_thresholds` therefore proposes no "
               "threshold (`None`): no sink is the result, not an artefact of a threshold — and the paper's φ > 20 "
               "could not be reached anyway on a 192-wide model (φ ≤ √192 = 13.9). Calibrated with the paper's "
               "numbers, the library says the same:"),
        ("code", "import warnings\n\n"
                 "from mech_vtokens.errors import ThresholdWarning\n\n"
                 "# the paper's numbers where nothing stands out; the ThresholdWarnings say why, printed once\n"
                 "with warnings.catch_warnings(record=True) as said:\n"
                 "    warnings.simplefilter('always', ThresholdWarning)\n"
                 "    part = calibrate(vlm, images[:20], prompts[:20], vit_threshold=t['vit'] or 75.0,\n"
                 "                     phi_threshold=t['phi'] or 20.0)   # one forward per batch\n"
                 "for text in dict.fromkeys(str(w.message).split(' (')[0] for w in said "
                 "if issubclass(w.category, ThresholdWarning)):\n"
                 "    print('ThresholdWarning:', text)\n"
                 "part"),
        ("code", "summary = summarize(vlm, images[:20], prompts[:20], partition=part)\nsummary.to_pandas()"),
        ("code", "res = part.classify(images[20:], prompts[20:])\nres.fractions()"),
        ("code", "dyn = mv.run(vlm, images[20:], prompts[20:], probes=[GroupDynamics(part)])['group_dynamics']\n"
                 "dyn.to_pandas().head(8)"),
        ("md", "Every `.plot()` returns a matplotlib Figure: the cell's value shows it (save it with "
               "`fig.savefig(path)`)."),
        ("code", "dyn.plot()"),
        ("md", "**Finding: every visual token is alive here, and alive tokens are rewritten.** With no sink and no "
               "dead cluster, the partition puts 100 % of the tokens in *alive* (table and fractions above). Their "
               "L2 norm grows from 9.9 at the LM input to 14.8 after the last block while their cosine to the "
               "input falls to 0.70 (left panel): the LM keeps transforming them, as the paper finds for its alive "
               "group (Sec. 5). To see what a partition with sinks and dead tokens looks like, Part B plants one."),
        ("md", "## B. A planted fixture (truth known by construction)"),
        ("code", "import shutil\nimport tempfile\nfrom pathlib import Path\n\nfrom mech_vtokens import testing as T\n\n"
                 "where = Path(tempfile.gettempdir()) / 'mech-vtokens-planted'  # one name: same figures each run\n"
                 "shutil.rmtree(where, ignore_errors=True)  # built afresh from the fixture's code\n"
                 "ppath, truth = T.planted_partition_model('llava', where)\n"
                 "pvlm = mv.load(ppath)\n"
                 "drawn = [T.planted_image(truth, seed=i, content=0.6) for i in range(40)]\n"
                 "pimages = [im for im, _ in drawn]\n"
                 "pprompts = [T.prompt('llava', 'what is in the image ?')] * len(pimages)"
                 "  # the fixture's format (first token = USER, its sink)\n"
                 "# a 64-wide model cannot reach the paper's thresholds "
                 "(φ ≤ √d = 8 < 20; tiny ViT norms): use the fixture's\n"
                 "ppart = calibrate(pvlm, pimages[:20], pprompts[:20], vit_threshold=truth['vit_threshold'],\n"
                 "                  phi_threshold=truth['phi_threshold'])\nppart"),
        ("code", "import numpy as np\n\nres = ppart.classify(pimages[20:], pprompts[20:])\n"
                 "want = np.concatenate([np.array(lab).reshape(-1) for _, lab in drawn[20:]])\n"
                 "print('token accuracy vs the planted truth:', (np.array(res.labels) == want).mean(), "
                 "'| fractions:', {g: round(f, 3) for g, f in res.fractions().items()})\n"
                 "summarize(pvlm, pimages[:20], pprompts[:20], partition=ppart).plot()"),
        ("code", "from mech_vtokens.views import PatchOverlay\n\n"
                 "batch = pvlm.prepare(pimages[20:22], pprompts[20:22])\n"
                 "one = mv.run(pvlm, pimages[20:22], pprompts[20:22], probes=[ppart])[ppart]\n"
                 "PatchOverlay(batch, 0, groups=one.labels, title='planted fixture: groups')"),
        ("md", "**Finding: the calibration recovers a planted partition exactly.** On 20 held-out images of the "
               "fixture the classification matches the planted truth for every token (accuracy 1.0): 5.6 % ViT "
               "sinks, 2.8 % LLM sinks, 36.1 % dead, 55.6 % alive, the bars of the plot. The overlay above colours "
               "one image's patches by group."),
        ("md", "Prune *dead* vs a seeded random set of the same size (paper Table 2 logic):"),
        ("code", "import torch\nfrom mech_vtokens.interventions import MatchedRandom, Prune, applied\n\n"
                 "dead = ppart.token_set('dead')\nwith torch.no_grad():\n"
                 "    base = pvlm.hf(**batch.inputs).logits[:, -1]\n"
                 "for name, iv in [('-dead', Prune(dead)), ('-matched random', Prune(MatchedRandom(dead, seed=0)))]:\n"
                 "    with applied(pvlm, batch, interventions=[iv]), torch.no_grad():\n"
                 "        d = (pvlm.hf(**batch.inputs).logits[:, -1] - base).norm(dim=-1)\n"
                 "    print(f'{name:16s} |Δ last logits|: {d.numpy().round(4)}')"),
        ("md", "**Finding: the dead tokens carry nothing the answer uses.** Pruning them moves the last-position "
               "logits by at most 0.0001; pruning as many random visual tokens moves them by 0.14 and 0.21 (paper "
               "Table 2: pruning dead tokens costs nothing, a matched random prune does)."),
    ],
    "03_interventions.ipynb": [
        ("md", "# Interventions: zero vFFN / vMHA, prune vs a matched random set, compare answers\n\n"
               "Paper Secs. 4.3, 5.1, 7.2 (Tables 1–3). Every intervention runs inside `mv.run` (one forward, with "
               "probes), in `mv.generate` (every step, one nnsight trace) and on a plain HF model / `generate` "
               "through `interventions.applied`."),
        ("code", SETUP),
        ("code", "import torch\nfrom mech_vtokens.interventions import AllVisual, Group, "
                 "MatchedRandom, Prune, ZeroSublayer, applied\n\n"
                 "from mech_vtokens.defaults import demo_qa\n\n"
                 "images, questions, truth = demo_qa(4)  # one question of each kind, with its ground truth\n"
                 "prompts = [vlm.prompt(q) for q in questions]\n"
                 "batch = vlm.prepare(images, prompts)\n\n"
                 "from contextlib import nullcontext\n\n"
                 "def answers(interventions=()):\n"
                 "    ctx = applied(vlm, batch, interventions=interventions) if interventions else nullcontext()\n"
                 "    with ctx, torch.no_grad():\n"
                 "        out = vlm.hf.generate(**batch.inputs, max_new_tokens=3, do_sample=False)\n"
                 "    return [vlm.tokenizer.decode(o[batch.visual_mask.shape[1]:], skip_special_tokens=True)"
                 " for o in out]\n\n"
                 "import pandas as pd\n\n"
                 "def table(columns):\n"
                 "    \"\"\"One row per image: the question, its ground truth, then one column per condition.\"\"\"\n"
                 "    return pd.DataFrame({'question': questions, 'truth': truth, **columns})"
                 ".rename_axis('image')\n\n"
                 "layers = list(range(vlm.n_layers))\n"
                 "table({\n"
                 "    'baseline': answers(),\n"
                 "    '-vMHA': answers([ZeroSublayer(AllVisual(), layers, 'attn')]),\n"
                 "    '-vFFN': answers([ZeroSublayer(AllVisual(), layers, 'mlp')]),\n"
                 "})"),
        ("md", "**Finding: zeroing the visual tokens' own sublayers changes no answer here.** With the visual "
               "attention (-vMHA) or MLP (-vFFN) output zeroed in every layer, all four answers stay right: the "
               "text tokens read the visual tokens' residual stream, which still holds the projector's output. (On "
               "LLaVA-1.5 the paper finds -vMHA hurts spatially grounded questions, Table c; the organism's "
               "questions are answerable from the input embeddings — notebook 01 shows how word-like they are.)"),
        ("md", "Prune at the LLM input: the sequence really gets shorter. Here the target set is the 30 % of visual "
               "tokens with the lowest L2 norm at the LM input (a stand-in for the calibrated *dead* group of the "
               "partition notebook), against a seeded random set of the same size per image."),
        ("code", "from mech_vtokens.probes import NormTracker\n\n"
                 "norms = mv.run(vlm, images, prompts, probes=[NormTracker(vision=False)])['norm_tracker']\n"
                 "df = norms.to_pandas()\n"
                 "emb = df[(df.site == 'hook_embed') & (df.visual_index >= 0)].sort_values('visual_index')\n"
                 "low = emb.groupby('image').l2.transform(lambda s: s <= s.quantile(0.3)).to_numpy()\n"
                 "target = Group(low, name='low-norm')\ncontrol = MatchedRandom(target, seed=0)\n\n"
                 "with torch.no_grad():\n    base = vlm.hf(**batch.inputs).logits[:, -1]\n"
                 "def last_logits(iv):\n"
                 "    with applied(vlm, batch, interventions=[iv]), torch.no_grad():\n"
                 "        return vlm.hf(**batch.inputs).logits[:, -1]\n"
                 "for name, iv in [('prune low-norm', Prune(target)), ('prune matched random', Prune(control))]:\n"
                 "    d = (last_logits(iv) - base).norm(dim=-1)\n"
                 "    print(f'{name:22s} |Δ last logits| per prompt: {d.numpy().round(3)}')"),
        ("code", "table({'baseline': answers(), 'prune low-norm': answers([Prune(target)]),\n"
                 "       'prune random': answers([Prune(control)])})"),
        ("md", "**Finding: low norm is not 'dead'.** Pruning the 30 % lowest-norm visual tokens breaks the count "
               "(image 0: four → two; its logits move 19.9 against 11.1 for the random prune), while the colour "
               "and shape answers survive both prunes and move the logits no more than random (1.2–1.6 vs "
               "1.6–5.9). A token set chosen by norm alone removes information; the calibrated dead group "
               "(notebook 02) is the one that removes none."),
        ("md", "An intervention can also report what the forward produced under it: `.report(answer_ids=[...])` "
               "reads, inside the trace, the logits at each prompt's last position and the log-probs of the given "
               "token ids (here each prompt's clean top-1 answer token). Nothing is read unless asked."),
        ("code", "top = base.argmax(-1)[:, None].tolist()  # each prompt's clean top-1 next token\n"
                 "res = mv.run(vlm, images, prompts,\n"
                 "             interventions=[Prune(target).report(answer_ids=top)])\n"
                 "res['prune'].to_pandas()[['row', 'answer_id', 'logprob']]"),
        ("md", "Inference-time L_in (Table 3): visual tokens enter at layer k — layers < k run on the text alone — or "
               "leave at layer k. `mv.generate` runs the interventions on every generation step in one nnsight "
               "generate trace (each layer's decode attends to its own cache: text-only below k, full from k on)."),
        ("code", "from mech_vtokens.interventions import VisualEntry, VisualExit\n\n"
                 "rows = {'baseline': mv.generate(vlm, images, prompts, max_new_tokens=3).text}\n"
                 "for k in range(1, vlm.n_layers):\n"
                 "    rows[f'L_in = {k}'] = mv.generate(vlm, images, prompts, interventions=[VisualEntry(k)], "
                 "max_new_tokens=3).text\n"
                 "    rows[f'exit at {k}'] = mv.generate(vlm, images, prompts, interventions=[VisualExit(k)], "
                 "max_new_tokens=3).text\n"
                 "table(rows)"),
        ("md", "**Finding: the count needs the visual tokens in the first layers.** Letting them enter at layer 1 "
               "already turns 'four' into 'three', from layer 2 into 'two'; the background colour breaks from L_in "
               "= 2 ('gray'), the triangle's colour and the square's shape survive every entry layer. Letting them "
               "leave after layer k changes one answer at k = 1 and none from k = 2: what the text needs from the "
               "image it reads in layers 0–1. The paper's 7B models skip shallow layers almost for free (Table c); "
               "a 4-layer organism has no redundant shallow layer."),
    ],
    "04_compose_in_your_trace.ipynb": [
        ("md", "# Compose probes inside your own nnsight trace\n\n`vlm.experiment(...)` plans the probes' sites in "
               "forward order; `exp.execute(vlm.model)` runs them inside *your* `with vlm.trace(...)` block, next to "
               "your own reads (which must follow forward order too)."),
        ("code", SETUP),
        ("code", "import nnsight\nfrom mech_vtokens.probes import EmbedLens, NormTracker\n\n"
                 "images, questions, _ = demo_inputs(2)\n"
                 "batch = vlm.prepare(images, [vlm.prompt(q) for q in questions])\n"
                 "exp = vlm.experiment(batch, probes=[EmbedLens(k=3), NormTracker()])\nexp"),
        ("code", "lm = vlm.model.model.language_model\nwith vlm.trace(**batch.inputs):\n"
                 "    raw = nnsight.save(exp.execute(vlm.model))\n"
                 "    # your own read, after the probes' last site in forward order:\n"
                 "    logits = nnsight.save(vlm.model.lm_head.output)\n"
                 "res = exp.results(raw)\nprint(logits.shape, list(res))\nres['embed_lens'].to_pandas().head()"),
        ("md", "Your own reads can also come *before* the probes' sites, as long as the whole body follows forward "
               "order. `vlm.sites` lists every site; the adapter maps each to its module:"),
        ("code", "for s in vlm.sites[:8]:\n    print(s, '->', vlm.adapter.site(s)[1:])"),
        ("md", "**Generation in your own trace.** Pass `steps=tracer.iter[:n]`: interventions that must act on every "
               "decode step (here `VisualEntry`: layers below k decode against a text-only cache) do, probes read "
               "the prompt's forward. Bind a saved dict first and read `tracer.result` in a second invoke, because "
               "an early EOS cuts the per-step loop short. `mv.generate` wraps exactly this."),
        ("code", "from mech_vtokens.interventions import VisualEntry\n\n"
                 "gen = vlm.experiment(batch, probes=[EmbedLens(k=3, sites=['hook_embed'])], "
                 "interventions=[VisualEntry(2)])\n"
                 "import warnings\n\n"
                 "with warnings.catch_warnings(), vlm.generate(max_new_tokens=4, do_sample=False) as tracer:\n"
                 "    # an EOS before step 4 leaves the step loop waiting: nnsight says so and keeps what was saved "
                 "(mv.generate does the same)\n"
                 "    warnings.filterwarnings('ignore', message='.*was never reached.*')\n"
                 "    raw = nnsight.save({})\n"
                 "    with tracer.invoke(**batch.inputs):\n"
                 "        gen.execute(vlm.model, steps=tracer.iter[:4], out=raw)\n"
                 "    with tracer.invoke():\n"
                 "        ids = nnsight.save(tracer.result)\n"
                 "lens_at_input = gen.results(raw)['embed_lens']\n"
                 "same = mv.generate(vlm, images, [vlm.prompt(q) for q in questions], "
                 "interventions=[VisualEntry(2)], max_new_tokens=4)\n"
                 "print(vlm.tokenizer.batch_decode(ids[:, batch.visual_mask.shape[1]:], skip_special_tokens=True), "
                 "'| mv.generate:', same.text)"),
        ("md", "**What to check:** the two lists printed above are equal: the generate trace you wrote, with "
               "`gen.execute(..., steps=tracer.iter[:n])`, is what `mv.generate` runs, so anything you add to "
               "that block (your own reads, a second intervention) composes with the library's components in "
               "the same forward and the same decode steps."),
    ],
    "05_remote_ndif.ipynb": [
        ("md", "# Remote on NDIF\n\nThe same code runs on NDIF with `remote=True` "
               "(a model loaded by its hub id, an NDIF "
               "API key configured with `nnsight.CONFIG.set_default_api_key(...)`). By default this notebook uses "
               "`remote='local'`, which runs the whole remote code path here: the trace is serialised, every module "
               "that NDIF does not have is hidden, the package's code is shipped by value (`nnsight.register`), then "
               "it runs — so a passing local run is strong evidence the real one works."),
        ("code", "REMOTE = 'local'  # True for the real NDIF service "
                 "(needs MODEL = a hub id and an API key)\n" + SETUP),
        ("code", "from mech_vtokens.partition.calibrate import phi_bound\n"
                 "from mech_vtokens.probes import EmbedLens, SinkChannels\n\nimages, questions, _ = demo_inputs(2)\n"
                 "prompts = [vlm.prompt(q) for q in questions]\n"
                 "tau = min(20.0, phi_bound(vlm) / 2)  # the paper's 20 where sqrt(d_model) allows it\n"
                 "res = mv.run(vlm, images, prompts, probes=[EmbedLens(k=3), SinkChannels(threshold=tau)], "
                 "remote=REMOTE)\n"
                 "lens, sinks = res['embed_lens'], res['sink_channels']\n"
                 "local_lens = mv.run(vlm, images, prompts, probes=[EmbedLens(k=3), SinkChannels(threshold=tau)])"
                 "['embed_lens']\n"
                 "print('identical to a local run:', lens.to_pandas().equals(local_lens.to_pandas()))\n"
                 "sinks.to_pandas().head()"),
        ("md", "Generation under interventions runs remotely the same way: one generate trace, the interventions "
               "acting on every step on the server."),
        ("code", "from mech_vtokens.interventions import Prune, Positions\n\n"
                 "far = mv.generate(vlm, images, prompts, interventions=[Prune(Positions.each_image(range(8)))], "
                 "max_new_tokens=4, remote=REMOTE)\n"
                 "near = mv.generate(vlm, images, prompts, interventions=[Prune(Positions.each_image(range(8)))], "
                 "max_new_tokens=4)\n"
                 "print('identical to a local run:', far.text == near.text)\nfar.to_pandas()"),
        ("md", "**Finding:** both checks print `True`: the probes' tables and the generated text that come back "
               "through the serialised remote path equal a plain local run's, value for value. What travels is "
               "the trace and the package's own code; nothing outside what NDIF has installed is needed."),
    ],
}


# ---- 06: the causal story on the organism (issue 17; mech_vtokens.patching / attribution) ------------------------
NOTEBOOKS["06_causal_patching.ipynb"] = [
    ("md", "# Which visual tokens, at which layer, cause the colour answer?\n\nActivation patching on the trained "
           "default model (the organism: a tiny LLaVA on a 3x3 world of coloured shapes, 36 visual tokens of 16 px). "
           "A pair is one seeded scene drawn twice: the questioned object RED in the source, BLUE in the target. We "
           "copy the source's visual tokens into the target's forward (both rows of ONE batch) and read the answer "
           "with metrics reduced inside the same forward. The pairs come from the organism's world, so this "
           "notebook is about the default model; the tools themselves work on every family."),
    ("code", SETUP.replace("vlm = mv.load(path)", "vlm = mv.load(path, attn_implementation='eager')"
                           "  # eager: per-head knockouts")),
    ("code", "from PIL import Image\nfrom mech_vtokens.patching import organism_colour_pairs\n\n"
             "pairs = organism_colour_pairs(16, seed=0)\np = pairs[0]\n"
             "print(p.question, '| regions:', {k: tuple(round(v) for v in b) for k, b in p.regions.items()})\n"
             "strip = Image.new('RGB', (192, 96))\nstrip.paste(p.source, (0, 0)); strip.paste(p.target, (96, 0))\n"
             "strip.resize((384, 192))"),
    ("md", "## Metrics, in the forward\n`LogitDiff`, `ChoiceProb`, `KLToClean` (the clean run is a row of the same "
           "batch) are probes at `unembed.hook_out`; they compose with any intervention. Here row 0 is the source, "
           "row 1 the target, row 2 the target with the object's tokens patched from row 0 after layer 0."),
    ("code", "from mech_vtokens.interventions import PatchActivations, Region\n"
             "from mech_vtokens.probes import ChoiceProb, KLToClean, LogitDiff\n\n"
             "prompt = vlm.prompt(p.question)\n"
             "patch = PatchActivations('blocks.0.hook_resid_post', Region(p.regions['object']), {2: 0})\n"
             "res = mv.run(vlm, [p.source, p.target, p.target], [prompt] * 3,\n"
             "             probes=[LogitDiff('red', 'blue'), ChoiceProb(['red', 'blue']), KLToClean(0)],\n"
             "             interventions=[patch])\n"
             "res['choice_prob'].to_pandas().pivot(index='row', columns='answer', values='value')"),
    ("code", "res['logit_diff'].values, res['kl_to_clean'].values"),
    ("md", "## The sweep: layers x regions, every variant a row of one batch\nThe object's box and a background "
           "box of the same size (shifted by whole patches onto empty background), patched at the LM input and "
           "after every decoder layer. `recovered` = (LD_patched - LD_target) / (LD_source - LD_target)."),
    ("code", "from mech_vtokens.patching import Variant, patch_sweep\n\n"
             "sites = ['hook_embed'] + [f'blocks.{i}.hook_resid_post' for i in range(vlm.n_layers)]\n"
             "def variants(p):\n"
             "    return [Variant(s, Region(p.regions[r]), r) for s in sites for r in ('object', 'background')]\n\n"
             "sweep = patch_sweep(vlm, pairs, variants, batch_size=96)\nsweep.summary().round(3)"),
    ("md", "Patching the object's tokens up to the output of layer 0 carries the whole answer; from layer 1's "
           "output on it carries almost nothing: by then the colour has been read from the visual tokens into "
           "the text positions. The background box never matters."),
    ("code", "sweep.plot()"),
    ("md", "## Which tokens? One variant per visual token, on the image\nEach of the 36 tokens patched alone "
           "(after layer 0) in its own row: the recovered fraction per token, drawn on the target image with the "
           "overlay."),
    ("code", "from mech_vtokens.views import PatchOverlay\n\n"
             "one = vlm.prepare([p.target], [prompt])\n"
             "# Variant(site, j, label): j = the image's j-th visual token\n"
             "tokens = patch_sweep(vlm, [p], lambda q: [Variant('blocks.0.hook_resid_post', j, j)\n"
             "                                        for j in range(one.n_visual)], batch_size=64).to_pandas()\n"
             "values = tokens.sort_values('region')['recovered'].to_numpy()  # region = the token's index\n"
             "PatchOverlay(one, 0, values=values, title='recovered by patching each token after layer 0')"),
    ("md", "## Which heads move it? Direct logit attribution and per-head knockout\nPer layer and head, the direct "
           "effect on logit(red) - logit(blue) of what the head reads from the visual tokens at the last position "
           "(measured exactly: one forward, one knocked-out copy per head; head -1 = the whole layer)."),
    ("code", "from mech_vtokens.attribution import direct_logit_attribution\n\n"
             "dla = direct_logit_attribution(vlm, p.source, prompt, a='red', b='blue')\n"
             "dla.pivot(index='layer', columns='head', values='dla').round(2)"),
    ("code", "from mech_vtokens.interventions import HeadKnockout\n\n"
             "top = dla[dla['head'] >= 0].nlargest(2, 'dla')\nheads = {int(top['layer'].iloc[0]): "
             "top['head'].astype(int).tolist()}\n"
             "ko = mv.run(vlm, [p.source] * 2, [prompt] * 2, probes=[ChoiceProb(['red', 'blue'])],\n"
             "            interventions=[HeadKnockout(heads, kind='vt', rows=[1])])\n"
             "print('knocked out', heads)\nko['choice_prob'].to_pandas().pivot(index='row', columns='answer', "
             "values='value')"),
    ("md", "## Attribution patching: the one-backward approximation\n`grad(LD) . (source - target activation)` per "
           "token, from one forward and one backward per batch of pairs. It ranks the variants like the real sweep "
           "but, being linear, underestimates a patch that flips the answer."),
    ("code", "from mech_vtokens.attribution import attribution_patching\n\n"
             "est = attribution_patching(vlm, pairs, variants, batch_size=96)\n"
             "m = sweep.to_pandas().merge(est[['pair', 'site', 'region', 'recovered']], "
             "on=['pair', 'site', 'region'], suffixes=('', '_estimate'))\n"
             "print('spearman:', round(m['recovered'].rank().corr(m['recovered_estimate'].rank()), 3))\n"
             "m.groupby(['site', 'region'], observed=True)[['recovered', 'recovered_estimate']].mean().round(3)"),
]


def notebook(cells):
    """The unexecuted notebook of one cell list."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_markdown_cell(src) if kind == "md" else nbformat.v4.new_code_cell(src)
                for kind, src in cells]
    for i, cell in enumerate(nb.cells):
        cell.id = f"cell-{i:02d}"  # stable ids: a rebuild changes nothing it need not (nbformat draws random ones)
    return nb


def kernel_env():
    """The kernel's environment: Jupyter's inline backend (a CI job may export Agg), this checkout's package first
    on the path, a fixed hash seed."""
    return dict(os.environ, MPLBACKEND="module://matplotlib_inline.backend_inline", PYTHONHASHSEED="0",
                TQDM_MININTERVAL="0",
                PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))


def execute(nb, timeout=600):
    """Run ``nb`` top to bottom in a fresh python3 kernel (cwd = this folder) and return it with its outputs, minus
    what is not a result: progress-bar widgets (tqdm.auto draws ipywidgets; their ids are random and a static page
    cannot show them) and per-run metadata."""
    from nbclient import NotebookClient

    NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=False, store_widget_state=False,
                   resources={"metadata": {"path": str(HERE)}}).execute(env=kernel_env())
    ids: dict = {}
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        cell.outputs = coalesce([o for o in cell.outputs if WIDGET not in o.get("data", {})])
        for o in cell.outputs:
            if "text" in o:
                o.text = scrub(o.text, ids)
            for mime in [m for m in o.get("data", {}) if m.startswith("text/")]:
                o.data[mime] = scrub(o.data[mime], ids)
        cell.metadata.pop("execution", None)
    nb.metadata.pop("widgets", None)
    nb.metadata.pop("language_info", None)  # the kernel's exact Python version: not part of the notebook
    return nb


def coalesce(outputs):
    """Adjacent stream outputs of one stream as one (how the kernel chunks a cell's prints depends on timing)."""
    out = []
    for o in outputs:
        if out and o.output_type == "stream" and out[-1].output_type == "stream" and out[-1].name == o.name:
            out[-1].text = "".join(out[-1].text) + "".join(o.text)
        else:
            out.append(o)
    return out


def scrub(text, ids: dict):
    """``text`` without what differs from one machine or run to the next: this checkout's path (``<checkout>``),
    temporary folders (``<tmp>``), object addresses (``0x0``) and the views' random element ids (numbered in order
    of appearance, consistently inside the notebook, so the HTML still works)."""
    if isinstance(text, list):
        text = "".join(text)
    text = text.replace(str(ROOT), "<checkout>")
    text = re.sub(re.escape(tempfile.gettempdir()) + r"/[\w.-]+", "<tmp>", text)
    text = re.sub(r" at 0x[0-9a-f]+>", " at 0x0>", text)
    return re.sub(r"\b(ov[0-9a-f]{10}|mvt-[0-9a-f]{12})\b",
                  lambda m: ids.setdefault(m.group(1), f"{m.group(1)[:-10]}{len(ids):010d}"), text)


def build(names=None):
    """Write (and execute) every notebook, or those in ``names``."""
    for name, cells in NOTEBOOKS.items():
        if names and name not in names:
            continue
        t0 = time.time()
        nb = execute(notebook(cells))
        nbformat.write(nb, HERE / name)
        print(f"wrote {HERE / name} ({time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    build(sys.argv[1:])
