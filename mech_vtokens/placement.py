"""Checks of ``load``'s placement arguments (``dtype``, ``device_map``, ``attn_implementation``), run before any
weight is read: a typo must not cost a multi-GB download or load, nor surface as a library error deep inside it."""

from __future__ import annotations

import torch

from .errors import InputError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# common spellings of the same three dtypes, accepted as they are (documented in README "Loading")
DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "f32": "float32", "fp16": "float16", "half": "float16",
                 "f16": "float16", "bf16": "bfloat16", "torch.float32": "float32", "torch.float16": "float16",
                 "torch.bfloat16": "bfloat16"}
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def close_match(value, valid) -> str:
    """" (did you mean 'x'?)" for the closest of ``valid`` to the string ``value``, or ""."""
    import difflib

    if not isinstance(value, str):
        return ""
    near = difflib.get_close_matches(value.lower(), [str(v) for v in valid], n=1, cutoff=0.6)
    return f" (did you mean {near[0]!r}?)" if near else ""


def check_dtype(dtype):
    """``dtype`` as ``from_pretrained`` takes it (None, "auto" or a torch float dtype); InputError otherwise.
    Accepts the names in ``DTYPES`` and their aliases in ``DTYPE_ALIASES`` ("bf16", "fp16", "half", ...)."""
    if dtype is None or dtype == "auto":
        return dtype
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    valid = ", ".join(repr(n) for n in ("auto", *DTYPES)) + " (or torch.float32 / torch.float16 / torch.bfloat16; " \
        "aliases: " + ", ".join(repr(a) for a in DTYPE_ALIASES if not a.startswith("torch.")) + ")"
    if isinstance(dtype, str) and dtype.strip().lower() in DTYPES:
        return DTYPES[dtype.strip().lower()]
    if isinstance(dtype, str) and dtype.strip().lower() in DTYPE_ALIASES:
        return DTYPES[DTYPE_ALIASES[dtype.strip().lower()]]
    hint = ""
    name = str(dtype).removeprefix("torch.") if isinstance(dtype, (str, torch.dtype)) else None
    if name is not None and isinstance(getattr(torch, name, None), torch.dtype):
        hint = (" (an integer or quantized model needs a quantization_config, e.g. BitsAndBytesConfig(load_in_8bit="
                "True), not dtype; a float dtype other than these three is not a load dtype)")
    else:
        hint = close_match(dtype, [*DTYPES, *DTYPE_ALIASES])
    raise InputError(f"dtype={dtype!r} is not a dtype a model can be loaded in{hint}; use one of {valid}")


def _check_device(dev, what: str) -> None:
    if isinstance(dev, int) and not isinstance(dev, bool):
        dev = f"cuda:{dev}"
    if dev in ("cpu", "disk", "meta") or (isinstance(dev, torch.device) and dev.type == "cpu"):
        return
    try:
        device = torch.device(dev)
    except (RuntimeError, TypeError):
        device = None
    available = _available()
    if device is not None and device.type in ("cuda", "xpu", "mps", "npu"):
        mod = getattr(torch, device.type, None)
        count = mod.device_count() if mod is not None and mod.is_available() else 0
        if device.index is None and count or device.index is not None and device.index < count:
            return
        raise InputError(f"{what}={dev!r}: this machine has {count} {device.type} device(s); use one of "
                         f"{available}")
    raise InputError(f"{what}={dev!r} is not a device; use one of {available}")


def _available() -> str:
    devs = ["'cpu'"]
    for kind in ("cuda", "xpu", "mps", "npu"):
        mod = getattr(torch, kind, None)
        if mod is not None and getattr(mod, "is_available", lambda: False)():
            devs += [f"'{kind}:{i}'" for i in range(mod.device_count())]
    return ", ".join(devs) + ", " + ", ".join(repr(s) for s in DEVICE_MAP_STRATEGIES) + \
        ", or a dict {module name: device} whose devices may also be 'disk' (with offload_folder=...)"


def check_device_map(device_map) -> None:
    """InputError unless ``device_map`` is None, a placement strategy, a device of this machine, or a dict of
    module names to such devices / "cpu" / "disk"."""
    if device_map is None or device_map in DEVICE_MAP_STRATEGIES:
        return
    if isinstance(device_map, dict):
        for name, dev in device_map.items():
            if not isinstance(name, str):
                raise InputError(f"device_map key {name!r}: keys are module names (e.g. 'model.language_model."
                                 f"layers.3', '' for the whole model)")
            if dev == "disk":
                continue
            _check_device(dev, f"device_map[{name!r}]")
        return
    if device_map == "disk":
        raise InputError("device_map='disk' places no module where it can run; give a dict that keeps some modules "
                         "on a device, e.g. {'': 'cpu'} or 'auto' with offload_folder=...")
    _check_device(device_map, "device_map")


def check_attn_implementation(attn) -> None:
    """InputError unless ``attn`` is None, "eager" or an attention function transformers registers (or a hub
    kernel "org/name")."""
    if attn is None:
        return
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    valid = ["eager", *ALL_ATTENTION_FUNCTIONS.valid_keys()]
    if isinstance(attn, str) and attn.startswith("flash_attention_") and attn in valid:
        from transformers.utils import import_utils

        have = getattr(import_utils, f"is_flash_attn_{attn.rsplit('_', 1)[-1]}_available", None)
        if have is not None and not have():
            raise InputError(f"attn_implementation={attn!r} needs the flash-attn package (and a GPU it supports), "
                             f"which this environment lacks; install it or use 'sdpa' (or 'eager' for attention "
                             f"patterns and AttentionKnockout)")
    if isinstance(attn, str) and (attn in valid or "/" in attn):
        return
    raise InputError(f"attn_implementation={attn!r} is not an attention implementation{close_match(attn, valid)}; "
                     f"use one of "
                     f"{', '.join(repr(v) for v in valid)} (\"eager\" for attention patterns and AttentionKnockout)")


def check_load_args(dtype, device_map, attn_implementation, hf_kwargs=None):
    """All three checks (and ``torch_dtype=`` among the pass-through keywords, which would skip the dtype check);
    returns ``dtype`` as ``from_pretrained`` takes it."""
    if hf_kwargs and "torch_dtype" in hf_kwargs:
        raise InputError(f"torch_dtype={hf_kwargs['torch_dtype']!r}: pass dtype={hf_kwargs['torch_dtype']!r} "
                         f"(transformers 5 renamed it; dtype is checked before any weight is read)")
    dtype = check_dtype(dtype)
    check_device_map(device_map)
    check_attn_implementation(attn_implementation)
    return dtype


def check_processor_arg(processor) -> None:
    """``load``'s ``processor=``: None (the model's own) or a loaded processor (with a tokenizer)."""
    if processor is None:
        return
    if isinstance(processor, (str, bytes)) or not callable(processor) or not hasattr(processor, "tokenizer"):
        raise InputError(f"processor={processor!r}: give a loaded processor (transformers.AutoProcessor."
                         f"from_pretrained(...)), or leave it out to load the model's own")


def check_hf_kwargs(hf_kwargs, config) -> None:
    """``load``'s pass-through keywords: each must be one ``from_pretrained`` / nnsight's model reads, or a config
    field it overrides; anything else (``dtpye=``) would become a config attribute nobody reads, or a deep error.
    No check where the keywords cannot be told (another transformers)."""
    if not hf_kwargs:
        return
    try:
        import inspect
        import re

        from nnsight import TransformersModel
        from transformers import PreTrainedModel

        src = inspect.getsource(PreTrainedModel.from_pretrained)
        known = set(inspect.signature(PreTrainedModel.from_pretrained).parameters)
        known |= set(re.findall(r"""kwargs\.pop\(\s*["'](\w+)["']""", src))
        for cls in TransformersModel.__mro__:
            if "__init__" in vars(cls):
                known |= set(inspect.signature(cls.__init__).parameters)
        fields = set(config.to_dict())
        text = config.get_text_config() if hasattr(config, "get_text_config") else None
        fields |= set(text.to_dict()) if text is not None else set()
    except Exception:  # noqa: BLE001 - cannot tell: no check rather than a wrong refusal
        return
    for key in hf_kwargs:
        if key not in known and key not in fields:
            raise InputError(f"load(): keyword {key}={hf_kwargs[key]!r} is neither a from_pretrained option nor a "
                             f"config field of this model{close_match(key, sorted(known | fields))}; it would be "
                             f"ignored or fail deep in transformers")


# what a local model directory needs for its processor: one file of each group (names as save_pretrained writes them)
PROCESSOR_FILES = {"image processor config": ("preprocessor_config.json", "processor_config.json"),
                   "tokenizer": ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model")}


def check_remote_value(remote) -> None:
    """InputError unless ``remote`` is False / None (local), True (NDIF) or "local" (the remote path, simulated)."""
    if remote is None or isinstance(remote, bool) or (isinstance(remote, str) and remote == "local"):
        return
    cli = " (\"ndif\" is the CLI's spelling of --remote; in Python NDIF is remote=True)" \
        if isinstance(remote, str) and remote.strip().lower() == "ndif" else close_match(remote, ["local"])
    raise InputError(f"remote={remote!r} is not a backend{cli}; use remote=False (here), remote=True (NDIF) or "
                     f"remote='local' (the whole remote code path, simulated here)")


def check_processor_files(source) -> None:
    """For a local model directory: InputError naming the processor files it lacks (before transformers turns the
    missing file into a hub lookup error)."""
    import os

    if not os.path.isdir(str(source)):
        return
    have = set(os.listdir(str(source)))
    missing = {what: names for what, names in PROCESSOR_FILES.items() if not have & set(names)}
    if missing:
        need = "; ".join(f"a {what} ({' or '.join(names)})" for what, names in missing.items())
        raise InputError(f"{source} holds no processor: it lacks {need}. Save the processor there "
                         f"(AutoProcessor.from_pretrained(<checkpoint>).save_pretrained({str(source)!r})) or pass "
                         f"it: mech_vtokens.load({str(source)!r}, processor=...)")


def load_processor(adapter_cls, source, config):
    """``adapter_cls.load_processor(source, config)`` with the processor files checked first (a local directory
    without them: InputError naming them) and a processor that fails to load (a broken file, an unreachable hub id)
    an InputError naming the source and the fix, not a raw OSError / JSONDecodeError."""
    check_processor_files(source)
    try:
        return adapter_cls.load_processor(source, config)
    except InputError:
        raise
    except (OSError, ValueError) as err:
        raise InputError(f"cannot load the processor of {source!r} ({type(err).__name__}: {err}); repair its files "
                         f"or pass it: mech_vtokens.load({source!r}, processor=...)") from None
