"""Single-patch benchmark (paper Sec. 7.1, App. E): the target lies in one visual patch for every family's geometry."""

import pytest
import torch

import mech_vtokens as mv
from mech_vtokens import single_patch as SP
from mech_vtokens import testing as T
from mech_vtokens.errors import InputError
from mech_vtokens.probes.activations import Activations


@pytest.mark.parametrize("family", T.FAMILIES)
def test_target_changes_only_its_own_patch(tiny_vlm, family):
    """Removing the target changes the projector output of its token far more than any other token's (the ViT's
    attention spreads a little of every patch everywhere, so "only" is measured as a >= 4x margin)."""
    vlm = tiny_vlm(family)
    samples = SP.make_samples(vlm, n=2, seed=1)
    assert {s.kind for s in samples} == set(SP.KINDS)
    for s in samples:
        batch = vlm.prepare([s.image], [vlm.image_placeholder])
        a = mv.run(vlm, [s.image], [vlm.image_placeholder], probes=[Activations(["vision_projector.hook_out"])])
        b = mv.run(vlm, [s.clean], [vlm.image_placeholder], probes=[Activations(["vision_projector.hook_out"])])
        a, b = a["activations"], b["activations"]
        d = a["vision_projector.hook_out"].shape[-1]
        change = (a["vision_projector.hook_out"] - b["vision_projector.hook_out"]).reshape(-1, d).float().norm(dim=-1)
        own = int(batch.tokens["projector_rows"][s.token])
        first = batch.tokens["projector_rows"][batch.tokens["tile"] <= 0]  # the thumbnail (InternVL) sees it too
        others = torch.tensor([float(change[r]) for r in first.tolist() if r != own])
        assert float(change[own]) > 0
        assert float(change[own]) >= 4 * float(others.max()), (family, s, float(change[own]), float(others.max()))


def test_questions_and_scorer_on_known_answers(tiny_vlm):
    vlm = tiny_vlm("llava")
    samples = SP.make_samples(vlm, n=3, seed=0)
    # a perfect answerer and one that always names the background: the insights must read 1 and 1 / 0
    perfect = [(i, k, a, a) for i, s in enumerate(samples) for k, _, a in s.qa]
    res = SP.score(vlm, samples, perfect)
    assert res["multi_attribute_both_right"] == 1.0 and res["colour_answer_is_text_colour"] == 1.0
    assert res["colour_answer_is_background"] == 0.0
    biased = [(i, k, a, samples[i].truth["background"] if k == "colour" and samples[i].kind == "ocr_color" else a)
              for i, s in enumerate(samples) for k, _, a in s.qa]
    res = SP.score(vlm, samples, biased)
    assert res["colour_answer_is_background"] == 1.0 and res["colour_answer_is_text_colour"] == 0.0
    with pytest.raises(InputError, match="unknown single-patch kinds"):
        SP.make_samples(vlm, kinds=["video"])
