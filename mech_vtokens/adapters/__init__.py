"""Model-family adapters: one file per family, each a declaration (see ``base.Adapter`` and docs/DESIGN.md).

Adding a family = one file with an ``Adapter`` subclass + its entry in ``ADAPTERS`` + a tiny fixture in
``mech_vtokens.testing``.
"""

from ..errors import InputError
from .base import Adapter
from .gemma3 import Gemma3Adapter
from .glm4v import Glm4vAdapter, Glm4vMoeAdapter
from .gemma4 import Gemma4Adapter
from .idefics3 import Idefics3Adapter, SmolVLMAdapter
from .internvl import InternVLAdapter
from .llava import LlavaAdapter
from .llava_next import LlavaNextAdapter
from .llava_onevision import LlavaOnevisionAdapter
from .mistral3 import Mistral3Adapter
from .qwen2_5_vl import Qwen25VLAdapter
from .qwen2_vl import Qwen2VLAdapter
from .qwen3_vl import Qwen3VLAdapter, Qwen3VLMoeAdapter
from .qwen3_5 import Qwen3_5Adapter, Qwen3_5MoeAdapter

ADAPTERS: tuple[type[Adapter], ...] = (LlavaAdapter, Qwen2VLAdapter, Qwen25VLAdapter, InternVLAdapter,
                                      Qwen3VLAdapter, Qwen3VLMoeAdapter, LlavaNextAdapter, LlavaOnevisionAdapter,
                                      Idefics3Adapter, SmolVLMAdapter)
ADAPTERS += (Gemma3Adapter,)
ADAPTERS += (Qwen3_5Adapter, Qwen3_5MoeAdapter)
ADAPTERS += (Mistral3Adapter,)
ADAPTERS += (Glm4vAdapter, Glm4vMoeAdapter)
ADAPTERS += (Gemma4Adapter,)


def supported() -> str:
    return ", ".join(f"{a.family} (model_type {'/'.join(a.model_types)})" for a in ADAPTERS)


def adapter_class_for(config) -> type[Adapter]:
    """The adapter class serving ``config.model_type``; a clear error listing the supported families otherwise."""
    model_type = getattr(config, "model_type", None)
    for cls in ADAPTERS:
        if model_type in cls.model_types:
            return cls
    raise InputError(
        f"unsupported model type {model_type!r}. Supported families: {supported()}. To add one, write an Adapter "
        f"subclass in mech_vtokens/adapters/<family>.py (module paths, geometry, processor class), list it in "
        f"mech_vtokens.adapters.ADAPTERS and add a tiny fixture to mech_vtokens.testing (see docs/DESIGN.md)")


__all__ = ["ADAPTERS", "Adapter", "adapter_class_for", "supported"]
