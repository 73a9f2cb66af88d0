"""``run``: images + prompts -> processor -> ONE forward where every probe and intervention acts at its site."""

from __future__ import annotations

import nnsight


def run(vlm, images, prompts, probes=(), interventions=(), remote=False, **processor_kwargs) -> list:
    """Run ``probes`` and ``interventions`` (any order, any number) in one forward over the batch.

    Returns one result per probe, then one per intervention. ``remote``: False (local), True (NDIF; the model must
    have been loaded by hub id) or ``"local"`` (the whole remote code path, simulated here).
    """
    vlm.check_remote(remote)
    batch = vlm.prepare(images, prompts, **processor_kwargs)
    exp = vlm.experiment(batch, probes, interventions)
    model = vlm.model
    with vlm.trace(**batch.inputs, remote=remote):
        raw = exp.execute(model)
        raw = nnsight.save(raw)
    return exp.results(raw)
