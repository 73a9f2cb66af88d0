"""mech-vtokens: mechanistic interpretability of the visual tokens of multimodal LLMs, on nnsight.

    import mech_vtokens as mv
    from mech_vtokens.probes import EmbedLens
    vlm = mv.load("llava-hf/llava-1.5-7b-hf")            # or a local dir, or mv.testing.tiny_model(...)
    res = mv.run(vlm, images, prompts, probes=[EmbedLens(k=5)]); lens = res["embed_lens"]
    lens.to_pandas()
    out = mv.generate(vlm, images, prompts, interventions=[Prune(dead)], max_new_tokens=20)   # out.text
"""

from .errors import InputError
from .experiment import Experiment
from .run import Generation, generate, run
from .vlm import VLM, Batch, load, register_remote

__all__ = ["VLM", "Batch", "Experiment", "Generation", "InputError", "generate", "load", "register_remote", "run"]
__version__ = "0.1.0"
