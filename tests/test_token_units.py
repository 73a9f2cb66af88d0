"""Issue 15 class 1: the unit of ``Positions`` is named. ``each_image`` / ``of_image`` count each image's own visual
tokens, ``in_batch`` (and bare ints) the batch's; bare ints on a multi-image batch warn; values read with another
meaning (floats, bools, strings) are refused; the record loops refuse batch-index ints whose meaning would depend on
``batch_size`` — all checked against masks built by hand from ``batch.visual_mask``."""

import warnings

import numpy as np
import pytest
import torch

from mech_vtokens import data as D
from mech_vtokens import testing as T
from mech_vtokens.errors import InputError
from mech_vtokens.evaluate import evaluate
from mech_vtokens.interventions import Prune, Rescale, ZeroSublayer
from mech_vtokens.runner import run_dataset
from mech_vtokens.token_sets import Complement, MatchedRandom, Positions, PositionsUnitWarning, resolve

P = T.prompt("llava")


def _by_hand(b, picks):
    """(batch, seq) mask: ``picks`` = {row: [index within that row's visual positions]} (one image per row)."""
    m = torch.zeros_like(b.visual_mask)
    for row, idx in picks.items():
        pos = b.visual_mask[row].nonzero().flatten()
        m[row, pos[idx]] = True
    return m


@pytest.fixture()
def two(tiny_vlm):
    vlm = tiny_vlm("llava")
    return vlm, vlm.prepare([T.image(60, seed=1), T.image(60, seed=2)], [P, P])


def test_each_image_of_image_and_in_batch_pick_the_tokens_named(two):
    vlm, b = two
    per = b.visual_tokens_per_image
    assert torch.equal(resolve(Positions.each_image([0, 3]), b), _by_hand(b, {0: [0, 3], 1: [0, 3]}))
    assert torch.equal(resolve(Positions.of_image(1, [2]), b), _by_hand(b, {1: [2]}))
    assert torch.equal(resolve(Positions.of_image(0, [per[0] - 1]), b), _by_hand(b, {0: [per[0] - 1]}))
    assert torch.equal(resolve(Positions.in_batch([per[0]]), b), _by_hand(b, {1: [0]}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a named unit never warns
        resolve(Positions.in_batch([1]), b)
        resolve(Positions.each_image([1]), b)
    with pytest.warns(PositionsUnitWarning, match="each_image.*of_image.*in_batch"):
        got = resolve(Positions([per[0] + 1]), b)  # bare ints: the batch's index, said
    assert torch.equal(got, _by_hand(b, {1: [1]}))
    one = vlm.prepare([T.image(60, seed=1)], [P])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one image: batch index == image index, nothing to warn about
        assert torch.equal(resolve(Positions([0, 3]), one), _by_hand(one, {0: [0, 3]}))
    rest = b.visual_mask & ~_by_hand(b, {0: [0], 1: [0]})
    assert torch.equal(resolve(Complement(Positions.each_image([0])), b), rest)


def test_values_read_with_another_meaning_are_refused(two):
    vlm, b = two
    n0 = b.visual_tokens_per_image[0]
    bad = [
        (lambda: Positions([0.5, 1.0]), "is a float, not a visual index"),
        (lambda: Positions([True, False]), "bool.*Group"),
        (lambda: Positions(np.array([True, False])), "bool.*Group"),
        (lambda: Positions("0,1"), "give a list of visual indices"),
        (lambda: Positions(3), "give a list of visual indices"),
        (lambda: Positions([(0, 1.5)]), "not a \\(row, position\\) pair of ints"),
        (lambda: Positions.each_image([(0, 1)]), "not \\(row, position\\) pairs"),
        (lambda: Positions([0], unit="images"), "Positions.each_image"),
        (lambda: Positions.of_image(-1, [0]), "an int >= 0"),
        (lambda: resolve(Positions.of_image(2, [0]), b), "the batch has 2 image"),
        (lambda: resolve(Positions.each_image([n0]), b), f"outside image 0's visual tokens 0..{n0 - 1}"),
        (lambda: resolve(Positions.in_batch([2 * n0]), b), "not one image's.*each_image"),
    ]
    for make, says in bad:
        with pytest.raises(InputError, match=says):
            make()
    good = resolve(Positions([np.int64(1), torch.tensor(2)]), vlm.prepare([T.image(60, seed=1)], [P]))
    assert good[0].nonzero().flatten().tolist() == b.visual_mask[0].nonzero().flatten()[[1, 2]].tolist()


def test_record_loops_refuse_batch_index_ints_before_any_work(no_forward, tmp_path):
    vlm = no_forward
    src = D.InMemory([T.image(60, seed=i) for i in range(3)], questions=["q"] * 3, answers=[["a"]] * 3)
    for ivs in ([Prune(Positions([0, 1]))], [Rescale(Positions.in_batch([2]), 2.0)],
                [ZeroSublayer(MatchedRandom(Positions([1]), seed=0), 0)], [Prune(Complement(Positions([0])))]):
        with pytest.raises(InputError, match="depend on batch_size.*Positions.each_image"):
            run_dataset(vlm, src, probes=["norms"], interventions=ivs, batch_size=2, out=tmp_path / "r",
                        progress=False)
        with pytest.raises(InputError, match="depend on batch_size.*Positions.each_image"):
            evaluate(vlm, src, {"c": ivs}, batch_size=2, progress=False)


def test_each_image_in_a_record_loop_does_not_depend_on_batch_size(tiny_vlm, tmp_path):
    vlm = tiny_vlm("llava")
    src = D.InMemory([T.image(60, seed=i) for i in range(3)], questions=["describe the image ."] * 3)
    frames = []
    for bs in (1, 2):
        st = run_dataset(vlm, src, probes=["norms"], interventions=[Rescale(Positions.each_image([0, 2]), 3.0)],
                         batch_size=bs, out=tmp_path / f"r{bs}", progress=False)
        frames.append(st.frame("norms").sort_values(list(st.frame("norms").columns[:4])).reset_index(drop=True))
    num = frames[0].select_dtypes("number").columns
    np.testing.assert_allclose(frames[0][num].to_numpy(float), frames[1][num].to_numpy(float), rtol=1e-4, atol=1e-4)
    st = run_dataset(vlm, src, probes=["norms"], interventions=[Rescale(Positions([0, 2]), 3.0)], batch_size=1,
                     out=tmp_path / "bare1", progress=False)  # batch_size=1: batch index == image index, allowed
    f = st.frame("norms").sort_values(list(st.frame("norms").columns[:4])).reset_index(drop=True)
    np.testing.assert_allclose(f[num].to_numpy(float), frames[0][num].to_numpy(float), rtol=1e-4, atol=1e-4)
