"""Checks of ``load``'s placement arguments (``dtype``, ``device_map``, ``attn_implementation``), run before any
weight is read: a typo must not cost a multi-GB download or load, nor surface as a library error deep inside it."""

from __future__ import annotations

import torch

from .errors import InputError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def check_dtype(dtype):
    """``dtype`` as ``from_pretrained`` takes it (None, "auto" or a torch float dtype); InputError otherwise."""
    if dtype is None or dtype == "auto":
        return dtype
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    valid = ", ".join(repr(n) for n in ("auto", *DTYPES)) + " (or torch.float32 / torch.float16 / torch.bfloat16)"
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    hint = ""
    if isinstance(dtype, torch.dtype) or (isinstance(dtype, str) and isinstance(getattr(torch, dtype, None),
                                                                                 torch.dtype)):
        hint = " (a quantized or integer model needs a quantization_config, not dtype)"
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
    if isinstance(attn, str) and (attn in valid or "/" in attn):
        return
    raise InputError(f"attn_implementation={attn!r} is not an attention implementation; use one of "
                     f"{', '.join(repr(v) for v in valid)} (\"eager\" for attention patterns and AttentionKnockout)")


def check_load_args(dtype, device_map, attn_implementation):
    """All three checks; returns ``dtype`` as ``from_pretrained`` takes it."""
    dtype = check_dtype(dtype)
    check_device_map(device_map)
    check_attn_implementation(attn_implementation)
    return dtype
