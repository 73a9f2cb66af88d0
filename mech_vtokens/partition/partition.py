"""The token partition (paper Secs. 4-6): every visual token is a ViT sink, an LLM sink, dead or alive.

A :class:`Partition` is what ``calibrate`` returns. It is a Probe: run it (alone or with other probes and
interventions, one forward) and it classifies the visual tokens of new images INSIDE the trace from a few reduced
numbers (remote-safe, torch only):

- ``rule="statistical"``: ViT sink = L2 norm at vision layer ``vit["layer"]`` (max over the patches merged into the
  token) > ``vit["threshold"]`` (Sec. 4.1); LLM sink = φ(x) = max_{d ∈ dims} |x[d]| / RMS(x) > ``llm["threshold"]``
  at ``llm["site"]`` (Sec. 4.2); dead = cosine of the LM-input token (``hook_embed``) to the calibrated dead
  prototype >= ``dead["tau"]`` (Sec. 5; the prototype is the stable, text-distant dominant cluster of the calibration
  images, App. B); alive = the rest (Sec. 6).
- ``rule="reference"`` (the authors' code): a token is in a group if its top-``k`` EmbedLens neighbours at
  ``hook_embed`` contain one of the group's reference ids (LLaVA-1.5-7B: 1141 ViT sink, 26673 LLM sink, 30296 dead).

Groups are exclusive, by priority ViT sink > LLM sink > dead > alive. ``token_set(group)`` gives an interventions
token set (``Prune(part.token_set("dead"))`` is "-Dead"; ``ZeroSublayer(part.token_set("llm_sink"), layers=1,
sublayer="mlp")`` is "LLM sinks -FF2"). ``save(path)`` / ``Partition.load(path, vlm)``: JSON + safetensors, no
pickle; loading checks the model identity (family, widths, vocabulary, an embedding fingerprint).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from mech_vtokens.token_sets import TokenSet

from ..component import Probe
from ..errors import InputError
from ..loop import DEFAULT_BATCH_SIZE, batches, forward
from ..results import Result

GROUPS = ("vit_sink", "llm_sink", "dead", "alive")
PRESETS = {"llava-1.5-7b": {"k": 3, "ids": {"vit_sink": [1141], "llm_sink": [26673], "dead": [30296]},
                            "vocab": 32000}}


def _weights_sample(hf) -> list[float]:
    """8 numbers from every parameter of ``hf`` (8 evenly spaced entries each, summed per position): two loads of
    the same weights give the same numbers, other weights (a fine-tune that keeps the embeddings too) others."""
    acc = torch.zeros(8, dtype=torch.float64)
    for _, p in sorted(hf.named_parameters(), key=lambda kv: kv[0]):
        if p.is_meta or p.numel() == 0:
            continue
        flat = p.detach().reshape(-1)
        idx = torch.linspace(0, flat.numel() - 1, 8, device=flat.device).long()
        acc += flat[idx].to("cpu", torch.float64)
    return [round(float(v), 5) for v in acc]


def model_identity(vlm) -> dict:
    """The model's identity, the ONE fingerprint of its weights (a saved partition and a resumable store check it):
    family, model type, widths, vocabulary, dtype, an embedding fingerprint (``fingerprint``) and a sample of every
    parameter (``weights``). ``name`` (the path it was loaded from) is informative only: ``./llava/`` and ``llava``
    are the same model, other weights at one path are not."""
    E = vlm.embedding_matrix.detach()
    gen = torch.Generator().manual_seed(1234)
    probe = torch.randn(E.shape[1], 4, generator=gen)
    fp = (torch.nn.functional.normalize(E[: min(256, E.shape[0])].float().cpu(), dim=1) @ probe).mean(0)
    cfg = vlm.hf.config
    return {"family": vlm.family, "model_type": getattr(cfg, "model_type", None),
            "name": getattr(cfg, "_name_or_path", None) or vlm.source, "hidden_size": int(E.shape[1]),
            "vocab": int(E.shape[0]), "n_layers": vlm.n_layers, "n_vision_layers": vlm.n_vision_layers,
            "dtype": str(E.dtype).replace("torch.", ""),
            "fingerprint": [round(float(v), 6) for v in fp], "weights": _weights_sample(vlm.hf)}


def identity_diff(saved: dict, now: dict) -> str | None:
    """Why ``saved`` and ``now`` (two :func:`model_identity` dicts) are not the same weights, or None."""
    for key in ("family", "hidden_size", "vocab", "n_layers", "n_vision_layers", "dtype"):
        if key in saved and saved.get(key) != now.get(key):
            return f"{key} = {saved.get(key)!r} there, {now.get(key)!r} here"
    for key in ("fingerprint", "weights"):
        a, b = saved.get(key), now.get(key)
        if a is not None and b is not None and any(abs(x - y) > 1e-3 * (1 + abs(x)) for x, y in zip(a, b)):
            return f"same shapes but other weights (the {key} fingerprint differs)"
    return None


def check_identity(saved: dict, vlm) -> None:
    now = model_identity(vlm)
    for key in ("family", "hidden_size", "vocab", "n_layers", "n_vision_layers"):
        if saved.get(key) != now[key]:
            raise InputError(f"this partition was calibrated for another model ({saved.get('name')!r}: {key} = "
                             f"{saved.get(key)!r}) but the loaded model has {key} = {now[key]!r}; calibrate it for "
                             f"this model with mech_vtokens.partition.calibrate(vlm, images)")
    diff = max(abs(a - b) for a, b in zip(saved["fingerprint"], now["fingerprint"]))
    if diff > 2e-2:
        raise InputError(f"this partition was calibrated for another model ({saved.get('name')!r}): same shapes but "
                         f"different input embeddings (fingerprint differs by {diff:.3g}); calibrate it for this model")


class Partition(Probe):
    """Classifies visual tokens into ViT sink / LLM sink / dead / alive inside the trace (paper Secs. 4-6).

    Build it with :func:`mech_vtokens.partition.calibrate` (or ``Partition.load``). ``classify(images, prompts)``
    runs one forward per batch; as a probe in ``mv.run`` it returns a :class:`PartitionResult`."""

    def __init__(self, rule, identity, vit=None, llm=None, dead=None, reference=None, info=None, vlm=None):
        if rule not in ("statistical", "reference"):
            raise InputError(f"rule={rule!r}: choose 'statistical' or 'reference'")
        self.rule, self.identity = rule, identity
        self.vit, self.llm, self.dead, self.reference = vit, llm, dead, reference
        self.info = info or {}
        self._vlm = vlm

    # ---- probe contract ---------------------------------------------------------------------------------------
    def _vision_site(self, vlm):
        return vlm.adapter.canonical(f"vision.blocks.{self.vit['layer']}.hook_resid_post")

    def sites(self, vlm):
        if self.rule == "reference":
            return ["hook_embed"]
        out = ["hook_embed"]
        if self.vit is not None:
            out.insert(0, self._vision_site(vlm))
        if self.llm is not None and self.llm.get("dims"):
            c = vlm.adapter.canonical(self.llm["site"])
            if c not in out:
                out.append(c)
        return out

    def check(self, vlm, batch):
        check_identity(self.identity, vlm)
        if self.llm is not None and self.llm.get("dims"):
            from .calibrate import warn_unreachable_phi

            warn_unreachable_phi(vlm, float(self.llm["threshold"]), "Partition")
        if batch.n_visual == 0:
            raise InputError("Partition classifies visual tokens, but the batch has none: pass images (and their "
                             "placeholders in the prompts)")

    def extras(self, vlm, batch):
        mine = {"visual": batch.visual_mask, "rule": self.rule}
        if self.rule == "reference":
            from mech_vtokens.probes.lens import _module_path

            ids = self.reference["ids"]
            mine.update(k=int(self.reference["k"]), embed=_module_path(vlm.hf, vlm.hf.get_input_embeddings()),
                        ref={g: torch.tensor(ids.get(g, []), dtype=torch.long) for g in GROUPS[:3]})
            return mine
        if self.vit is not None:
            mine.update(vision_site=self._vision_site(vlm), vision_rows=batch.tokens["vision_rows"],
                        vision_weights=batch.tokens["vision_weights"],
                        vit_threshold=float(self.vit["threshold"]))
        if self.llm is not None and self.llm.get("dims"):
            mine.update(llm_site=vlm.adapter.canonical(self.llm["site"]),
                        dims=torch.tensor(self.llm["dims"], dtype=torch.long),
                        phi_threshold=float(self.llm["threshold"]))
        if self.dead is not None:
            mine.update(prototype=self.dead["prototype"].float(), dead_tau=float(self.dead["tau"]))
        return mine

    def at(self, site, value, ctx, out):
        mine = ctx["mine"]
        with torch.no_grad():
            x = value.detach()
            if mine.get("vision_site") == site:
                norms = x.reshape(-1, x.shape[-1]).float().norm(dim=-1)
                from mech_vtokens.adapters.geometry import row_max

                # a token without a vision row (a newline) is NaN here: no ViT sink
                out["vit_sink"] = row_max(norms, mine["vision_rows"], mine["vision_weights"]) > mine["vit_threshold"]
            if site == "hook_embed":
                h = x[mine["visual"]]
                if mine["rule"] == "reference":
                    from mech_vtokens.adapters.base import _resolve
                    from mech_vtokens.ops import topk_rerank

                    w = _resolve(ctx["model"], mine["embed"]).weight.detach()
                    norms = torch.cat([w[s:s + 2048].float().norm(dim=1) for s in range(0, w.shape[0], 2048)])
                    scale = torch.where(norms > 0, 1.0 / norms.clamp_min(1e-30), torch.zeros_like(norms))
                    k = mine["k"]
                    _, ids, _ = topk_rerank(h, w, k, max(2 * k, k + 3), 8192, row_scale=scale, normalize=True)
                    for g, ref in mine["ref"].items():
                        out[g] = torch.isin(ids, ref.to(ids.device)).any(-1) if len(ref) else \
                            torch.zeros(len(ids), dtype=torch.bool, device=ids.device)
                elif "prototype" in mine:
                    hn = torch.nn.functional.normalize(h.float(), dim=-1)
                    p = torch.nn.functional.normalize(mine["prototype"].to(hn.device), dim=-1)
                    out["dead_cos"] = (hn @ p.T).amax(-1)
                    out["dead"] = out["dead_cos"] >= mine["dead_tau"] - 1e-6
            if mine.get("llm_site") == site:
                h = x[mine["visual"]].float()
                rms = h.pow(2).mean(-1).sqrt().clamp_min(1e-30)
                phi = h[:, mine["dims"]].abs().amax(-1) / rms
                out["phi"] = phi
                out["llm_sink"] = phi > mine["phi_threshold"]

    def collect(self, raw, batch, vlm):
        n = batch.n_visual
        codes = torch.full((n,), 3, dtype=torch.long)
        for g in reversed(GROUPS[:3]):  # priority: vit > llm > dead (written last wins)
            if g in raw:
                codes[raw[g].bool()] = GROUPS.index(g)
        extra = {k: raw[k] for k in ("phi", "dead_cos") if k in raw}
        return PartitionResult(codes, batch, extra)

    # ---- use ------------------------------------------------------------------------------------------------
    @property
    def vlm(self):
        if self._vlm is None:
            raise InputError("this Partition is not bound to a model; use Partition.load(path, vlm) or calibrate()")
        return self._vlm

    def classify(self, images, prompts=None, *, batch_size: int = DEFAULT_BATCH_SIZE, remote=False,
                 progress: bool = False):
        """Classify the visual tokens of ``images``: one forward per ``batch_size`` images. Returns a
        :class:`PartitionResult` over all of them (``n_forwards`` says how many forwards ran)."""
        results = []
        for _, batch in batches(self.vlm, images, prompts, batch_size, progress):
            results.append(forward(self.vlm, batch, [self], remote=remote)[self])
        return PartitionResult.concat(results)

    def token_set(self, group: str):
        """An interventions token set of ``group`` ("vit_sink", "llm_sink", "sinks", "dead", "alive"), resolved
        per batch by classifying it (one forward, cached per batch)."""
        if group not in GROUPS + ("sinks",):
            raise InputError(f"unknown group {group!r}: choose one of {GROUPS + ('sinks',)}")
        return PartitionGroup(self, group)

    # ---- persistence ------------------------------------------------------------------------------------------
    def save(self, path) -> str:
        """Write ``path/partition.json`` (rule, thresholds, ids, model identity) and ``path/partition.safetensors``
        (the dead prototype). No pickle."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        meta = {"format": "mech_vtokens.partition/1", "rule": self.rule, "identity": self.identity,
                "vit": self.vit, "llm": self.llm, "reference": self.reference, "info": self.info,
                "dead": None if self.dead is None else {"tau": self.dead["tau"]}}
        tensors = {}
        if self.dead is not None:
            tensors["dead_prototype"] = self.dead["prototype"].float().contiguous()
        (path / "partition.json").write_text(json.dumps(meta, indent=1, default=_jsonable))
        save_file(tensors or {"empty": torch.zeros(1)}, str(path / "partition.safetensors"))
        return str(path)

    @classmethod
    def load(cls, path, vlm) -> "Partition":
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / "partition.json").exists():
            raise InputError(f"no partition.json in {str(path)!r}; give the directory written by Partition.save")
        meta = json.loads((path / "partition.json").read_text())
        check_identity(meta["identity"], vlm)
        tensors = load_file(str(path / "partition.safetensors"))
        dead = None
        if meta.get("dead") is not None:
            dead = {"tau": meta["dead"]["tau"], "prototype": tensors["dead_prototype"]}
        return cls(meta["rule"], meta["identity"], meta.get("vit"), meta.get("llm"), dead, meta.get("reference"),
                   meta.get("info"), vlm)

    def __repr__(self) -> str:
        bits = [f"rule={self.rule!r}"]
        if self.rule == "reference":
            bits.append(f"ids={self.reference['ids']}, k={self.reference['k']}")
        else:
            if self.vit:
                bits.append(f"vit_threshold={self.vit['threshold']:g}")
            if self.llm:
                bits.append(f"sink_dims={self.llm['dims']}, phi>{self.llm['threshold']:g} at {self.llm['site']}")
            bits.append("dead prototype" if self.dead is not None else "no dead group found")
        return f"Partition({', '.join(bits)}; model {self.identity.get('name')!r})"

    def __getstate__(self):  # shipped into a (remote) trace: no model
        state = dict(self.__dict__)
        state["_vlm"] = None
        return state


def _jsonable(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    raise TypeError(f"cannot save {type(o).__name__} in partition.json")


class PartitionGroup(TokenSet):
    """The tokens of one partition group, as an interventions token set (see ``Partition.token_set``): resolving it
    against a batch classifies that batch (one forward, cached for the last batch)."""

    def __init__(self, partition, group):
        self.partition, self.group, self._cache = partition, group, {}

    def visual(self, batch):
        key = id(batch)
        if key not in self._cache:
            res = forward(self.partition.vlm, batch, [self.partition])[self.partition]  # the running job's backend
            self._cache = {key: (batch, res.codes)}  # holds the batch, so its id stays unique while cached
        codes = self._cache[key][1]
        if self.group == "sinks":
            return codes <= 1
        return codes == GROUPS.index(self.group)

    def __repr__(self):
        return f"PartitionGroup({self.group!r})"


class PartitionResult(Result):
    """Group of every visual token: ``codes`` (n,) indices into ``GROUPS``; ``to_pandas()`` one row per token
    (visual_index, kind, image, tile, grid_row, grid_col, group, + phi / dead_cos when computed); ``masks()``;
    ``fractions(kinds=)``: the share of each group among the visual tokens of ``kinds`` (``batch.kinds``; default
    ``results.REGION_KINDS``, the tokens that show the image: LLaVA-NeXT / OneVision's newline tokens left out)."""

    name = "partition"

    def __init__(self, codes, batch, extra=None, frame=None, n_forwards=1):
        self.codes = codes
        self.extra = extra or {}
        self._batch = batch
        self._frame = frame
        self.n_forwards = n_forwards

    @property
    def labels(self) -> list[str]:
        return [GROUPS[int(c)] for c in self.codes]

    def masks(self) -> dict:
        return {g: self.codes == i for i, g in enumerate(GROUPS)}

    def fractions(self, kinds=None) -> dict:
        from ..results import REGION_KINDS, check_kinds

        kinds = check_kinds(REGION_KINDS if kinds is None else kinds, "PartitionResult.fractions")
        of_kind = torch.as_tensor(self.to_pandas().kind.isin(kinds).to_numpy(), dtype=torch.bool)
        codes = self.codes[of_kind]
        n = max(1, len(codes))
        return {g: float((codes == i).sum()) / n for i, g in enumerate(GROUPS)}

    def to_pandas(self):
        if self._frame is not None:
            return self._frame
        from ..results import visual_index_frame

        df = visual_index_frame(self._batch)
        df["group"] = self.labels
        for k, v in self.extra.items():
            df[k] = v.float().numpy()
        return df

    @classmethod
    def concat(cls, results):
        import pandas as pd

        frames, off = [], 0
        for r in results:
            df = r.to_pandas().copy()
            df["image"] += off
            off = int(df["image"].max()) + 1 if len(df) else off
            frames.append(df)
        codes = torch.cat([r.codes for r in results])
        return cls(codes, None, {}, pd.concat(frames, ignore_index=True), len(results))

    def plot(self, image=0, ax=None):
        """The token grid of ``image`` coloured by group."""
        from ..views.figure import figure_of, subplots
        import numpy as np
        from matplotlib.colors import ListedColormap

        df = self.to_pandas()
        d = df[df.image == image]
        if not len(d):
            raise InputError(f"image {image} has no visual tokens here")
        d = d[d.tile == d.tile.max()]
        grid = np.full((d.grid_row.max() + 1, d.grid_col.max() + 1), np.nan)
        grid[d.grid_row, d.grid_col] = [GROUPS.index(g) for g in d.group]
        if ax is None:
            _, ax = subplots(figsize=(4, 4))
        from matplotlib.patches import Patch

        from ..views.figure import GROUP_COLORS, GROUP_NAMES, integer_layers

        ax.imshow(grid, cmap=ListedColormap([GROUP_COLORS[g] for g in GROUPS]), vmin=0, vmax=len(GROUPS) - 1)
        ax.set_title(f"partition of image {image}", fontsize=9)
        ax.set_xlabel("grid column")
        ax.set_ylabel("grid row")
        integer_layers(ax, "x")
        integer_layers(ax, "y")
        counts = d.group.value_counts()
        ax.legend(handles=[Patch(color=GROUP_COLORS[g], label=f"{GROUP_NAMES[g]} ({int(counts.get(g, 0))})")
                           for g in GROUPS], fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
        return figure_of(ax)
