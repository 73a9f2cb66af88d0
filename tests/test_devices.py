"""Device discipline, proved on a CPU machine.

Code that runs inside a trace (components' ``at``, the scheduler's ``_execute``) must create every tensor on the
device of the value it works on: a factory call without ``device=`` makes a CPU tensor, which breaks as soon as it
meets a CUDA value (and, on a model split over several devices, a value of another device). On a CPU machine such a
call works by accident, so the trap below flags it: a ``TorchFunctionMode`` that records every tensor factory call
(``torch.zeros``, ``torch.full``, ``torch.tensor``, ...: torch's own list of device constructors) made without
``device=`` while a component's ``at`` or the scheduler is on the stack. Model code outside them (HF's forward) is
not judged. The trap's own test plants such a call and sees it caught.
"""

from __future__ import annotations

import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors

import mech_vtokens as mv
from mech_vtokens import testing as T
from mech_vtokens.component import Component, Probe, ctx_on, on_device

_FACTORIES = _device_constructors()
_SCHEDULER = ("_execute", "_execute_steps")


def _in_trace_code(frame) -> bool:
    while frame is not None:
        code = frame.f_code
        if code.co_name == "at" and isinstance(frame.f_locals.get("self"), Component):
            return True
        if code.co_name in _SCHEDULER and code.co_filename.endswith("experiment.py"):
            return True
        if code.co_name == "visit" and code.co_filename.endswith("sites.py"):  # the one site access, both backends
            return True
        frame = frame.f_back
    return False


class DeviceTrap(TorchFunctionMode):
    """Records factory calls without ``device=`` made by trace code (``hits``: "name at file:line"), and counts
    those made with it (``seen``), so a test can tell that the trap watched trace code at all."""

    def __init__(self):
        super().__init__()
        self.hits, self.seen = [], 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _FACTORIES and _in_trace_code(sys._getframe(1)):
            if kwargs.get("device") is None:
                f = sys._getframe(1)
                while f is not None and "/torch/" in f.f_code.co_filename:
                    f = f.f_back
                self.hits.append(f"torch.{func.__name__} at {f.f_code.co_filename}:{f.f_lineno}")
            else:
                self.seen += 1
        return func(*args, **kwargs)


@pytest.fixture(scope="module")
def bf16_vlm(tiny_dir):
    cache = {}

    def get(family):
        if family not in cache:  # bf16: the lenses' exact re-rank path (the fp32 model skips it); eager: knockout
            cache[family] = mv.load(tiny_dir(family), dtype="bfloat16", attn_implementation="eager")
        return cache[family]

    return get


def _runs():
    from mech_vtokens.interventions import (AttentionKnockout, Complement, MatchedRandom, Positions, Prune, Rescale,
                                            VisualEntry, VisualExit, ZeroSublayer)
    from mech_vtokens.probes import (Activations, EmbedLens, LabelMatching, LogitLens, NormTracker, SinkChannels,
                                     ViTSinks)

    every_probe = [EmbedLens(k=3), LogitLens(k=3, logprobs=True), SinkChannels(threshold=3.0), NormTracker(),
                   ViTSinks(threshold=3.0), LabelMatching([["cat"], ["red", "dog"]], k=5),
                   Activations(["hook_embed", "blocks.1.hook_resid_post"])]
    return [
        ({"probes": every_probe}, False),
        ({"probes": [EmbedLens(k=3, skip_special=True, candidates=3), SinkChannels(dims=[0, 1]),
                     LogitLens(k=2, skip_special=True)]}, False),
        ({"interventions": [Prune(MatchedRandom(Positions([0, 1]), seed=1)).report(answer_ids=[[1, 2], [3, 4]])],
          "probes": [EmbedLens(k=3), NormTracker(), SinkChannels(threshold=3.0)]}, True),
        ({"interventions": [Rescale(Complement(Positions([0]))).report(), ZeroSublayer("all", 1, "mlp")]}, True),
        ({"interventions": [ZeroSublayer("all", [0, 2], "attn", every_step=True)]}, True),
        ({"interventions": [VisualEntry(1)], "probes": [EmbedLens(k=3)]}, True),
        ({"interventions": [VisualExit(1)], "probes": [LogitLens(k=2)]}, True),
        ({"interventions": [AttentionKnockout("vt", 0), AttentionKnockout("vv", 2)]}, True),
    ]


@pytest.mark.parametrize("fam", ["llava", "qwen2_5_vl", "qwen3_vl", "llava_next", "llava_onevision", "smolvlm"])
def test_trace_code_creates_every_tensor_on_the_value_device(bf16_vlm, fam):
    """Every probe, every intervention, mv.generate and applied(HF generate) under the trap: no factory call in
    trace code lacks device=; every result's tensors are on the CPU."""
    from mech_vtokens.interventions import Prune, Positions, VisualEntry, applied
    from mech_vtokens.probes import EmbedLens

    vlm = bf16_vlm(fam)
    ims, prs = [T.image(seed=1), T.image(seed=2)], [T.prompt(fam), T.prompt(fam, "describe the image")]
    trap = DeviceTrap()
    results = []
    with trap:
        for kw, gen in _runs():
            results += mv.run(vlm, ims, prs, **kw).values()
            if gen:
                results += mv.generate(vlm, ims, prs, max_new_tokens=3, **kw).results.values()
        batch = vlm.prepare(ims, prs)
        for ivs in ([Prune(Positions([0, 1]))], [VisualEntry(1)]):
            with applied(vlm, batch, interventions=ivs, probes=[EmbedLens(k=2)]):
                vlm.hf.generate(**batch.inputs, max_new_tokens=3, do_sample=False)
    assert trap.seen > 0, "the trap saw no factory call in trace code: it is not watching"
    assert not trap.hits, "factory calls without device= in trace code:\n" + "\n".join(sorted(set(trap.hits)))
    for r in results:
        for name, t in _tensors(vars(r)):
            assert t.device.type == "cpu", f"{type(r).__name__}.{name} is on {t.device}"


def _tensors(obj, name=""):
    if isinstance(obj, torch.Tensor):
        yield name, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{name}.{k}" if name else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{name}[{i}]")


class _Careless(Probe):
    """A planted mistake: a probe whose ``at`` makes a CPU tensor next to the value."""

    def sites(self, vlm):
        return ["blocks.0.hook_resid_post"]

    def at(self, site, value, ctx, out):
        out["norm"] = value.norm(dim=-1) + torch.zeros(value.shape[:2])  # no device=: wrong on a GPU
        out["ok"] = torch.zeros(value.shape[:2], device=value.device)


def test_the_trap_catches_a_planted_factory_call_without_device(tiny_vlm):
    vlm = tiny_vlm("llava")
    trap = DeviceTrap()
    with trap:
        exp = vlm.experiment(vlm.prepare([T.image()], [T.prompt("llava")]), probes=[_Careless()])
        # outside trace code: a factory call without device= is fine (CPU is where results live) and not flagged
        torch.zeros(2)
        mv.run(vlm, [T.image()], [T.prompt("llava")], probes=[_Careless()])
    assert exp is not None
    assert len(trap.hits) == 1 and trap.hits[0].startswith("torch.zeros at ") and __file__ in trap.hits[0], trap.hits
    assert trap.seen == 1


def test_ctx_moves_to_the_device_of_each_site():
    """The scheduler hands each component its ctx (masks, layout, extras) on the device of the site's value: a
    model split over devices has several; meta stands in for a second device here."""
    ctx = {"visual_mask": torch.ones(1, 3, dtype=torch.bool), "model": object(), "k": 3,
           "extras": {0: {"select": torch.zeros(2, 3), "ids": [torch.arange(2)], "pair": (torch.ones(1), "x")}}}
    cache = {}
    meta = ctx_on(ctx, (None, {"hidden": torch.empty(1, device="meta")}), cache)
    assert meta["model"] is ctx["model"] and meta["k"] == 3 and meta["extras"][0]["pair"][1] == "x"
    moved = [meta["visual_mask"], meta["extras"][0]["select"], meta["extras"][0]["ids"][0],
             meta["extras"][0]["pair"][0]]
    assert all(t.is_meta for t in moved)
    assert ctx_on(ctx, torch.empty(1, device="meta"), cache) is meta  # once per device and forward
    cpu = ctx_on(ctx, torch.zeros(1), cache)
    assert cpu["visual_mask"] is ctx["visual_mask"]  # already there: no copy
    assert on_device(ctx, None) is ctx


# ------------------------------------------------------------------------------------------------------------------
# Bad placement arguments: InputError naming the valid values, before any weight is read.
# ------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, names", [
    ({"dtype": "b16"}, ["'bfloat16'", "'float16'"]),  # "bf16" is an accepted alias now (placement.DTYPE_ALIASES)
    ({"dtype": "bfloat61"}, ["'bfloat16'"]),
    ({"dtype": "int8"}, ["quantization_config", "'bfloat16'"]),
    ({"dtype": torch.int8}, ["quantization_config"]),
    ({"device_map": "cuda:7"}, ["cuda device(s)", "'cpu'", "'auto'"]),
    ({"device_map": "autoo"}, ["'auto'", "'balanced'", "'cpu'"]),
    ({"device_map": {"": "gpu0"}}, ["'cpu'", "'disk'"]),
    ({"attn_implementation": "eagre"}, ["'eager'", "'sdpa'"]),
])
def test_bad_placement_arguments_raise_before_any_weight_is_read(tiny_dir, monkeypatch, kwargs, names):
    import transformers
    from nnsight import TransformersModel

    from mech_vtokens.errors import InputError

    path = tiny_dir("llava")

    def no_weights(*a, **k):
        raise AssertionError("weights were read before the arguments were checked")

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(no_weights))
    monkeypatch.setattr(TransformersModel, "__init__", no_weights)
    if torch.cuda.device_count() > 7 and kwargs.get("device_map") == "cuda:7":
        pytest.skip("this machine has a cuda:7")
    with pytest.raises(InputError) as err:
        mv.load(path, **kwargs)
    for name in names:
        assert name in str(err.value), (name, str(err.value))


def test_good_placement_arguments_pass_the_checks():
    from mech_vtokens.placement import check_load_args

    assert check_load_args("bfloat16", "auto", "eager") is torch.bfloat16
    assert check_load_args(torch.float16, {"model.language_model.layers.0": "cpu", "lm_head": "disk"}, "sdpa") \
        is torch.float16
    assert check_load_args("auto", "cpu", None) == "auto"
    assert check_load_args(None, None, "kernels-community/flash-attn") is None


# ------------------------------------------------------------------------------------------------------------------
# The layout check's real forward: InternVL3's dynamic rope, and a wrong declaration still caught.
# ------------------------------------------------------------------------------------------------------------------

def _internvl_with_dynamic_rope(tmp_path):
    import json

    path = T.tiny_model("internvl", tmp_path / "ivl")
    cfg = json.loads((tmp_path / "ivl" / "config.json").read_text())
    text = cfg["text_config"]
    text.pop("rope_parameters", None)  # as the real InternVL3-1B-hf config.json writes it
    text.update(rope_scaling={"rope_type": "dynamic", "factor": 2.0}, rope_theta=1000000.0)
    (tmp_path / "ivl" / "config.json").write_text(json.dumps(cfg))
    return path


def test_layout_check_runs_with_internvl3_dynamic_rope_and_still_catches_a_wrong_site(tmp_path, monkeypatch):
    from mech_vtokens.probes import EmbedLens

    from mech_vtokens.adapters.internvl import InternVLAdapter
    from mech_vtokens.layout import LayoutError

    path = _internvl_with_dynamic_rope(tmp_path)
    vlm = mv.load(path)
    assert vlm.hf.config.text_config.rope_parameters["rope_type"] == "dynamic"
    lens = mv.run(vlm, [T.image()], [T.prompt("internvl")], probes=[EmbedLens(k=2)])["embed_lens"]
    assert len(lens.to_pandas()) > 0 and int(lens.ids["hook_embed"].min()) >= 0
    # the check still proves shapes: declare the MLP output at the MLP's first projection (width 128, not 64)
    monkeypatch.setattr(InternVLAdapter, "mlp", "mlp.gate_proj", raising=False)
    with pytest.raises(LayoutError, match=r"hook_mlp_out.*\(1, 2, 128\), expected \(1, 2, 64\)"):
        mv.load(path)


# ------------------------------------------------------------------------------------------------------------------
# Offloaded maps (accelerate hooks): same results as the plain run.
# ------------------------------------------------------------------------------------------------------------------

_OFFLOAD_MAP = {"model.vision_tower": "cpu", "model.multi_modal_projector": "cpu",
                "model.language_model.embed_tokens": "disk", "model.language_model.layers.0": "cpu",
                "model.language_model.layers.1": "disk", "model.language_model.layers.2": "cpu",
                "model.language_model.norm": "cpu", "lm_head": "disk"}


def test_offloaded_map_gives_the_plain_results(tiny_dir, tiny_vlm, tmp_path):
    """Embedding, one decoder layer and lm_head offloaded to disk (meta placeholders + accelerate hooks), the rest
    placed on the CPU with hooks: lenses read the real matrices from the hooks' weights maps; probes, an intervention
    and generation equal the plain run (ids equal, values <= 1e-5)."""
    from mech_vtokens.interventions import Positions, Prune, ZeroSublayer
    from mech_vtokens.probes import EmbedLens, LogitLens, NormTracker

    plain = tiny_vlm("llava")
    off = mv.load(tiny_dir("llava"), device_map=_OFFLOAD_MAP, offload_folder=str(tmp_path / "offload"))
    lm = off.hf.model.language_model
    assert lm.embed_tokens.weight.is_meta and off.hf.lm_head.weight.is_meta and hasattr(lm.embed_tokens, "_hf_hook")
    assert torch.equal(off.embedding_matrix, plain.embedding_matrix)
    ims, prs = [T.image(seed=1), T.image(seed=2)], [T.prompt("llava"), T.prompt("llava", "describe the image")]

    def runs(vlm):
        probes = [EmbedLens(k=3), LogitLens(k=3, logprobs=True), NormTracker()]
        res = mv.run(vlm, ims, prs, probes=probes, interventions=[ZeroSublayer("all", 1, "mlp")])
        gen = mv.generate(vlm, ims, prs, probes=[EmbedLens(k=2)], interventions=[Prune(Positions([0, 1]))],
                          max_new_tokens=4, min_new_tokens=4)
        return res, gen

    (p_res, p_gen), (o_res, o_gen) = runs(plain), runs(off)
    for a, b in ((p_res["embed_lens"], o_res["embed_lens"]), (p_res["logit_lens"], o_res["logit_lens"]),
                 (p_gen.results["embed_lens"], o_gen.results["embed_lens"])):
        for site in a.ids:
            assert torch.equal(a.ids[site], b.ids[site]), site
            torch.testing.assert_close(b.scores[site], a.scores[site], atol=1e-5, rtol=0, equal_nan=True)
    import pandas as pd

    pd.testing.assert_frame_equal(o_res["norm_tracker"].to_pandas(), p_res["norm_tracker"].to_pandas(),
                                  check_exact=False, atol=1e-5, rtol=0)
    assert torch.equal(o_gen.sequences, p_gen.sequences)
