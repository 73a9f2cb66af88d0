"""``run``: images + prompts -> processor -> ONE forward where every probe and intervention acts at its site.
``generate``: the same, then greedy / sampled generation with the interventions acting on every step."""

from __future__ import annotations

import inspect
import warnings

import nnsight

from .component import on_device
from .defaults import MAX_NEW_TOKENS
from .errors import InputError
from .loop import counted, forward, keywords
from .results import Result, Results


@keywords
def run(vlm, images, prompts, *, probes=(), interventions=(), remote=False, processor_kwargs=None) -> Results:
    """Run ``probes`` and ``interventions`` (any order, any number) in one forward over the batch.

    Returns a :class:`~mech_vtokens.results.Results`: every component's result keyed by its name, probes then
    interventions (``res["embed_lens"]``, ``"embed_lens_1"`` for a second one, or ``res[lens]`` by the object).
    ``remote``: False (local), True (NDIF; the model must
    have been loaded by hub id) or ``"local"`` (the whole remote code path, simulated here). ``processor_kwargs``:
    options for the processor (e.g. ``{"max_pixels": N}``). For many images in batches see
    :func:`mech_vtokens.loop.batches` / :func:`mech_vtokens.runner.run_dataset`.
    """
    vlm.check_remote(remote)
    batch = vlm.prepare(images, prompts, **(processor_kwargs or {}))
    return forward(vlm, batch, probes, interventions, remote=remote)


def _generate_keywords():
    """What ``generate``'s ``**generate_kwargs`` may hold: HF generation-config fields and ``generate``'s own."""
    from transformers import GenerationConfig, GenerationMixin

    return set(GenerationConfig().to_dict()) | set(inspect.signature(GenerationMixin.generate).parameters)


class Generation(Result):
    """What :func:`generate` returns: ``text`` (one string per returned sequence: ``num_return_sequences`` per
    prompt, consecutive), ``ids`` (sequences, new tokens; pad after an early stop), ``sequences`` (prompt + new ids,
    as HF's ``generate``), ``output`` (what HF's ``generate`` returned, e.g. its ``logits`` with
    ``return_dict_in_generate=True, output_logits=True``), ``results`` (a :class:`~mech_vtokens.results.Results`: the
    probes, read on the prompt's forward, and the interventions, keyed by name), ``prompts`` (one per sequence)."""

    name = "generation"

    def __init__(self, sequences, prompt_len, tokenizer, results, prompts):
        if isinstance(sequences, dict):  # HF's ModelOutput: keep its class, its tensors on the CPU
            for key in list(sequences.keys()):
                sequences[key] = on_device(sequences[key], "cpu")
        else:
            sequences = sequences.cpu()
        self.output = sequences  # HF's whole output (scores, logits, ...) with return_dict_in_generate=True
        sequences = getattr(sequences, "sequences", sequences)
        self.sequences = sequences
        self.ids = sequences[:, prompt_len:]
        self.text = tokenizer.batch_decode(self.ids, skip_special_tokens=True)
        self.results = results
        copies = len(sequences) // len(prompts)  # num_return_sequences / beams: consecutive copies per prompt
        self.prompts = [p for p in prompts for _ in range(copies)]

    def to_pandas(self):
        import pandas as pd

        return pd.DataFrame({"row": range(len(self.text)), "prompt": self.prompts, "text": self.text})


@keywords(extra=_generate_keywords)
def generate(vlm, images, prompts, *, probes=(), interventions=(), max_new_tokens: int = MAX_NEW_TOKENS,
             remote=False, processor_kwargs=None, **generate_kwargs) -> Generation:
    """Generate under ``interventions`` (and read ``probes`` on the prompt's forward), in ONE nnsight generate trace.

    Interventions act where the paper defines them: ``Prune`` / ``VisualEntry`` / ``VisualExit`` on the prefill and
    on every decode step (the shortened cache, continued positions, per-window masks), ``ZeroSublayer`` /
    ``Rescale`` / ``AttentionKnockout`` on the prefill (``ZeroSublayer(every_step=True)``, ``AttentionKnockout("vt",
    every_step=True)``: every step).
    ``generate_kwargs`` go to HF's ``generate`` (``do_sample``, ``min_new_tokens``, ...; greedy by default).
    ``remote`` as in :func:`run`. The same as HF's ``generate`` under ``interventions.applied(...)``, token for token.
    Beam search and several sequences per prompt work with interventions (each copy of a prompt gets its token
    sets); probes need one sequence per prompt.
    """
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise InputError(f"generate: max_new_tokens must be a positive int, got {max_new_tokens!r}")
    copies = max(int(generate_kwargs.get("num_beams") or 1), int(generate_kwargs.get("num_return_sequences") or 1))
    if probes and copies > 1:
        raise InputError(f"generate: probes read the prompt's forward, which generation with num_beams / "
                         f"num_return_sequences > 1 runs {copies} times per prompt; run the probes with "
                         f"mech_vtokens.run(...) and generate without them (interventions work with beams)")
    vlm.check_remote(remote)
    batch = vlm.prepare(images, prompts, **(processor_kwargs or {}))
    exp = vlm.experiment(batch, probes, interventions) if (probes or interventions) else None
    model = vlm.model
    generate_kwargs.setdefault("do_sample", False)
    for key, value in vlm.adapter.generate_defaults.items():  # what the family needs so the prefill is a whole forward
        generate_kwargs.setdefault(key, value)
    with warnings.catch_warnings():
        # an early stop (EOS before max_new_tokens) leaves the per-step loop waiting for a step that never comes:
        # nnsight warns and keeps what was saved, which is what we want
        warnings.filterwarnings("ignore", message=".*was never reached.*")
        with vlm.generate(max_new_tokens=max_new_tokens, remote=remote, **generate_kwargs) as tracer:
            raw = nnsight.save({})
            with tracer.invoke(**batch.inputs):
                if exp is not None:
                    exp.execute(model, steps=tracer.iter[:max_new_tokens], out=raw)
            with tracer.invoke():
                sequences = nnsight.save(tracer.result)
    counted()
    results = exp.results(raw) if exp is not None else Results([])
    return Generation(sequences, batch.visual_mask.shape[1], vlm.processor.tokenizer, results, batch.prompts)
