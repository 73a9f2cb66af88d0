"""Train the model organism: a tiny LLaVA on the synthetic world, on CPU.

    python -m mech_vtokens.organism.train --out DIR [--threads 2] [--seed 0] [--smoke]

Stages (LLaVA-style; step counts are fixed so the result does not depend on machine load):

  clip      a small ``CLIPModel`` trained contrastively on image-caption pairs (captions identical within a batch
            count as positives);
  text      the Llama LM alone on text: captions and question/answer pairs with the caption in place of the image;
  projector ``LlavaForConditionalGeneration`` with the CLIP vision tower (layer -2, CLS dropped, strategy "default")
            frozen, the LM frozen: only the projector learns (captioning + QA, loss on the answer / caption tokens);
  joint     projector + LM (+ the vision tower at a lower learning rate unless ``--freeze-vision``).

There is NO auxiliary loss tying visual tokens to word embeddings: whatever EmbedLens finds emerges from the
task losses alone. After every stage the state is written to ``DIR/stages/<stage>.pt`` and a re-run with the same
``--out`` resumes after the last finished stage. The final model + processor are written with ``save_pretrained``
to ``DIR`` (loadable offline with ``LlavaForConditionalGeneration.from_pretrained`` / ``AutoProcessor``).
"""
from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import world

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
PAD, UNK, BOS, EOS, IMG = range(5)
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
CAPTION_PROMPT = "describe the image ."
HELDOUT_SEED = "heldout"


@dataclass
class Recipe:
    n_train: int = 30000
    # CLIP
    clip_hidden: int = 128
    clip_layers: int = 4
    clip_text_layers: int = 2
    clip_steps: int = 800
    clip_batch: int = 128
    clip_lr: float = 1e-3
    # LM
    lm_hidden: int = 192
    lm_layers: int = 4
    lm_heads: int = 4
    lm_intermediate: int = 512
    text_steps: int = 1000
    text_batch: int = 64
    text_lr: float = 1e-3
    projector_steps: int = 1000
    projector_lr: float = 1e-3
    joint_steps: int = 1500
    joint_lr: float = 5e-4
    vision_lr_scale: float = 0.2  # joint stage; 0 = vision tower frozen
    batch: int = 32
    caption_fraction_projector: float = 0.5
    caption_fraction_joint: float = 0.25
    warmup: int = 100
    weight_decay: float = 0.01  # AdamW, all stages but text
    text_weight_decay: float = 0.01  # AdamW, text stage
    dtype: str = "float32"  # dtype of the saved checkpoint

    @classmethod
    def smoke(cls) -> "Recipe":
        return cls(n_train=400, clip_hidden=32, clip_layers=2, clip_text_layers=1, clip_steps=8, clip_batch=32,
                   lm_hidden=32, lm_layers=2, lm_heads=2, lm_intermediate=64, text_steps=8, text_batch=16,
                   projector_steps=8, joint_steps=8, batch=8, warmup=2)


# ---------------------------------------------------------------------------------------------------- tokenizer


def vocab() -> list[str]:
    return SPECIALS + world.vocabulary()


def build_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = vocab()
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", BOS)])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"}, model_max_length=128,
    )
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    assert tok.convert_tokens_to_ids("<image>") == IMG
    return tok


class Encoder:
    """Fast word -> id mapping, identical to the saved word-level tokenizer (checked in the tests)."""

    def __init__(self):
        self.ids = {w: i for i, w in enumerate(vocab())}

    def __call__(self, text: str) -> list[int]:
        return [self.ids.get(w, UNK) for w in text.split()]


# ---------------------------------------------------------------------------------------------------- data


def pixels(arr: np.ndarray) -> torch.Tensor:
    """uint8 (n, H, W, 3) -> normalised float (n, 3, H, W), the same as CLIPImageProcessorPil at this size."""
    x = torch.from_numpy(arr).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


class Data:
    def __init__(self, samples: list[world.Sample]):
        self.samples = samples
        self.images = world.images_to_array(samples)
        self.enc = Encoder()
        self.captions = [s.caption for s in samples]
        self.cap_ids = [self.enc(c) for c in self.captions]
        self.qa = [[(k, self.enc(q), self.enc(a)) for k, q, a in s.qa] for s in samples]
        self.prompt_ids = self.enc(CAPTION_PROMPT)

    def __len__(self):
        return len(self.samples)


def pad_batch(seqs: list[list[int]], labels: list[list[int]]):
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), PAD, dtype=torch.long)
    lab = torch.full((len(seqs), n), -100, dtype=torch.long)
    att = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, (s, lb) in enumerate(zip(seqs, labels)):
        ids[i, : len(s)] = torch.tensor(s)
        lab[i, : len(lb)] = torch.tensor(lb)
        att[i, : len(s)] = 1
    return ids, lab, att


def text_batch(data: Data, idx: list[int], rng: random.Random):
    """Text-only LM batch: caption [+ question answer], next-token loss everywhere."""
    seqs = []
    for i in idx:
        s = [BOS] + data.cap_ids[i]
        if rng.random() < 0.7:
            _, q, a = rng.choice(data.qa[i])
            s = s + q + a
        seqs.append(s + [EOS])
    return pad_batch(seqs, seqs)  # labels = inputs (lm_loss shifts them)


def vlm_batch(data: Data, idx: list[int], rng: random.Random, caption_fraction: float, n_img: int):
    """Image batch: [bos] <image>*n prompt target [eos]; loss on target + eos."""
    seqs, labels = [], []
    for i in idx:
        if rng.random() < caption_fraction:
            prompt, target = data.prompt_ids, data.cap_ids[i]
        else:
            _, prompt, target = rng.choice(data.qa[i])
        s = [BOS] + [IMG] * n_img + prompt + target + [EOS]
        lb = [-100] * (1 + n_img + len(prompt)) + target + [EOS]
        seqs.append(s)
        labels.append(lb)
    ids, lab, att = pad_batch(seqs, labels)
    return ids, lab, att, pixels(data.images[idx])


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)


# ---------------------------------------------------------------------------------------------------- models


def clip_config(r: Recipe):
    from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig

    vc = CLIPVisionConfig(hidden_size=r.clip_hidden, intermediate_size=4 * r.clip_hidden,
                          num_hidden_layers=r.clip_layers, num_attention_heads=max(1, r.clip_hidden // 32),
                          image_size=world.IMAGE_SIZE, patch_size=world.PATCH, projection_dim=r.clip_hidden)
    tc = CLIPTextConfig(vocab_size=len(vocab()), hidden_size=r.clip_hidden, intermediate_size=4 * r.clip_hidden,
                        num_hidden_layers=r.clip_text_layers, num_attention_heads=max(1, r.clip_hidden // 32),
                        max_position_embeddings=64, projection_dim=r.clip_hidden,
                        pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    return CLIPConfig(text_config=tc.to_dict(), vision_config=vc.to_dict(), projection_dim=r.clip_hidden)


def llava_config(r: Recipe, vision_config):
    from transformers import LlamaConfig, LlavaConfig

    tc = LlamaConfig(vocab_size=len(vocab()), hidden_size=r.lm_hidden, intermediate_size=r.lm_intermediate,
                     num_hidden_layers=r.lm_layers, num_attention_heads=r.lm_heads, num_key_value_heads=r.lm_heads,
                     max_position_embeddings=128, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
                     tie_word_embeddings=False)
    cfg = LlavaConfig(vision_config=vision_config, text_config=tc, image_token_id=IMG, vision_feature_layer=-2,
                      vision_feature_select_strategy="default", projector_hidden_act="gelu",
                      image_seq_length=world.GRID * world.GRID, tie_word_embeddings=False)
    cfg.pad_token_id = PAD
    cfg.architectures = ["LlavaForConditionalGeneration"]
    return cfg


def build_processor(tokenizer=None):
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    ip = CLIPImageProcessorPil(size={"shortest_edge": world.IMAGE_SIZE},
                               crop_size={"height": world.IMAGE_SIZE, "width": world.IMAGE_SIZE},
                               image_mean=CLIP_MEAN, image_std=CLIP_STD, do_convert_rgb=True)
    return LlavaProcessor(image_processor=ip, tokenizer=tokenizer or build_tokenizer(), patch_size=world.PATCH,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          image_token="<image>")


# ---------------------------------------------------------------------------------------------------- training loop


def cosine_lr(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def run_loop(name: str, steps: int, params_groups, make_batch, loss_fn, warmup: int, log: dict,
             weight_decay: float = 0.01):
    opt = torch.optim.AdamW(params_groups, weight_decay=weight_decay)
    base = [g["lr"] for g in opt.param_groups]
    ema = None
    t0 = time.time()
    bar = tqdm(range(steps), desc=name, dynamic_ncols=True, mininterval=2.0)
    for step in bar:
        for g, b in zip(opt.param_groups, base):
            g["lr"] = cosine_lr(step, steps, b, warmup)
        loss = loss_fn(make_batch(step))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
        opt.step()
        v = loss.item()
        ema = v if ema is None else 0.98 * ema + 0.02 * v
        if step % 20 == 0:
            bar.set_postfix(loss=f"{ema:.3f}")
    log[name] = {"steps": steps, "seconds": round(time.time() - t0, 1), "final_loss_ema": round(ema or 0.0, 4)}
    print(f"[{name}] {steps} steps in {time.time() - t0:.0f}s, loss(ema) {ema:.3f}", flush=True)


def train(out: Path, recipe: Recipe, seed: int = 0, threads: int = 2) -> Path:  # noqa: C901 - staged, resumable recipe
    from transformers import CLIPModel, LlavaForConditionalGeneration

    torch.set_num_threads(threads)
    out = Path(out)
    stages_dir = out / "stages"
    stages_dir.mkdir(parents=True, exist_ok=True)
    log_path = stages_dir / "log.json"
    log = json.loads(log_path.read_text()) if log_path.exists() else {}
    log["recipe"] = asdict(recipe)
    log["seed"] = seed
    log["threads"] = threads
    t_start = time.time()

    torch.manual_seed(seed)
    t0 = time.time()
    data = Data(world.make_samples(recipe.n_train, seed))
    print(f"world: {len(data)} training images in {time.time() - t0:.1f}s", flush=True)
    n_img = world.GRID * world.GRID

    def save_stage(name, obj):
        torch.save(obj, stages_dir / f"{name}.pt.tmp")
        (stages_dir / f"{name}.pt.tmp").replace(stages_dir / f"{name}.pt")
        log_path.write_text(json.dumps(log, indent=1))

    def done(name):
        return (stages_dir / f"{name}.pt").exists()

    # ---------------------------------------------------------------- stage clip
    ccfg = clip_config(recipe)
    clip = CLIPModel(ccfg)
    if done("clip"):
        clip.load_state_dict(torch.load(stages_dir / "clip.pt"))
        print("[clip] resumed from stage file", flush=True)
    else:
        rng = random.Random(f"clip-{seed}")
        torch.manual_seed(seed * 1000 + 1)

        def clip_batch(step):
            idx = rng.sample(range(len(data)), recipe.clip_batch)
            caps = [data.captions[i] for i in idx]
            ids, _, att = pad_batch([[BOS] + data.cap_ids[i] + [EOS] for i in idx], [[0]] * len(idx))
            same = torch.tensor([[a == b for b in caps] for a in caps], dtype=torch.float32)
            return pixels(data.images[idx]), ids, att, same / same.sum(1, keepdim=True)

        def clip_loss(b):
            px, ids, att, target = b
            # `clip` is the enclosing train()'s local, read through the closure while run_loop runs below;
            # ruff reports F821 only because of the later `del clip` (after the last call of this function).
            o = clip(input_ids=ids, attention_mask=att, pixel_values=px)  # noqa: F821
            li = o.logits_per_image
            return 0.5 * (torch.sum(-target * F.log_softmax(li, 1), 1).mean()
                          + torch.sum(-target * F.log_softmax(li.t(), 1), 1).mean())

        clip.train()
        run_loop("clip", recipe.clip_steps, [{"params": list(clip.parameters()), "lr": recipe.clip_lr}],
                 clip_batch, clip_loss, recipe.warmup, log, recipe.weight_decay)
        log["clip"]["heldout_caption_retrieval"] = clip_retrieval(clip, seed)
        print(f"[clip] held-out caption retrieval (500-way): {log['clip']['heldout_caption_retrieval']:.3f}")
        save_stage("clip", clip.state_dict())

    # ---------------------------------------------------------------- LLaVA
    cfg = llava_config(recipe, ccfg.vision_config)
    torch.manual_seed(seed * 1000 + 2)
    model = LlavaForConditionalGeneration(cfg)
    vt = model.model.vision_tower
    missing, unexpected = vt.load_state_dict(clip.vision_model.state_dict(), strict=False)
    assert not unexpected and all("position_ids" in m for m in missing), (missing, unexpected)
    del clip
    lm = model.model.language_model
    proj = model.model.multi_modal_projector

    def set_trainable(vision: bool, projector: bool, language: bool):
        for p in vt.parameters():
            p.requires_grad_(vision)
        for p in proj.parameters():
            p.requires_grad_(projector)
        for p in list(lm.parameters()) + list(model.lm_head.parameters()):
            p.requires_grad_(language)

    def vlm_loss(b):
        ids, lab, att, px = b
        o = model(input_ids=ids, attention_mask=att, pixel_values=px)
        return lm_loss(o.logits, lab)

    for stage in ["text", "projector", "joint"]:
        if done(stage):
            continue
        prev = {"text": None, "projector": "text", "joint": "projector"}[stage]
        if prev and done(prev):
            model.load_state_dict(torch.load(stages_dir / f"{prev}.pt"))
            print(f"[{stage}] starting from stage file {prev}.pt", flush=True)
        rng = random.Random(f"{stage}-{seed}")
        torch.manual_seed(seed * 1000 + 3 + ["text", "projector", "joint"].index(stage))
        model.train()
        if stage == "text":
            set_trainable(False, False, True)

            def make(step):
                return text_batch(data, rng.sample(range(len(data)), recipe.text_batch), rng)

            def loss_fn(b):
                ids, lab, att = b
                logits = model.lm_head(lm(input_ids=ids, attention_mask=att).last_hidden_state)
                lab = lab.masked_fill(att == 0, -100)
                return lm_loss(logits, lab)

            groups = [{"params": list(lm.parameters()) + list(model.lm_head.parameters()), "lr": recipe.text_lr}]
            run_loop("text", recipe.text_steps, groups, make, loss_fn, recipe.warmup, log, recipe.text_weight_decay)
        elif stage == "projector":
            set_trainable(False, True, False)
            vt.eval()

            def make(step):
                return vlm_batch(data, rng.sample(range(len(data)), recipe.batch), rng,
                                 recipe.caption_fraction_projector, n_img)

            groups = [{"params": list(proj.parameters()), "lr": recipe.projector_lr}]
            run_loop("projector", recipe.projector_steps, groups, make, vlm_loss, recipe.warmup, log,
                     recipe.weight_decay)
        else:
            unfreeze = recipe.vision_lr_scale > 0
            set_trainable(unfreeze, True, True)

            def make(step):
                return vlm_batch(data, rng.sample(range(len(data)), recipe.batch), rng,
                                 recipe.caption_fraction_joint, n_img)

            groups = [{"params": list(proj.parameters()) + list(lm.parameters()) + list(model.lm_head.parameters()),
                       "lr": recipe.joint_lr}]
            if unfreeze:
                groups.append({"params": list(vt.parameters()), "lr": recipe.joint_lr * recipe.vision_lr_scale})
            run_loop("joint", recipe.joint_steps, groups, make, vlm_loss, recipe.warmup, log, recipe.weight_decay)
        save_stage(stage, model.state_dict())

    model.load_state_dict(torch.load(stages_dir / "joint.pt"))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    log["total_seconds_this_run"] = round(time.time() - t_start, 1)
    save_final(model, out, recipe)
    log_path.write_text(json.dumps(log, indent=1))
    print(f"saved to {out} ({time.time() - t_start:.0f}s this run)", flush=True)
    return out


@torch.no_grad()
def clip_retrieval(clip, seed: int, n: int = 500) -> float:
    """Fraction of held-out images whose own caption is the best of ``n`` held-out captions."""
    clip.eval()
    d = Data(world.make_samples(n, f"{HELDOUT_SEED}-clip"))
    ids, _, att = pad_batch([[BOS] + c + [EOS] for c in d.cap_ids], [[0]] * n)
    o = clip(input_ids=ids, attention_mask=att, pixel_values=pixels(d.images))
    pred = o.logits_per_image.argmax(1)
    ok = [d.captions[p] == d.captions[i] for i, p in enumerate(pred.tolist())]
    clip.train()
    return float(np.mean(ok))


def save_final(model, out: Path, recipe: Recipe) -> None:
    from transformers import GenerationConfig

    dtype = getattr(torch, recipe.dtype)
    model.config.architectures = ["LlavaForConditionalGeneration"]
    model.generation_config = GenerationConfig(bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
                                               max_new_tokens=40, do_sample=False)
    model.to(dtype).save_pretrained(out)
    model.to(torch.float32)
    build_processor().save_pretrained(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="tiny CI-sized run that exercises every stage")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override recipe fields")
    a = ap.parse_args(argv)
    recipe = Recipe.smoke() if a.smoke else Recipe()
    for kv in a.set:
        k, v = kv.split("=", 1)
        typ = type(getattr(recipe, k))
        setattr(recipe, k, typ(v))
    train(a.out, recipe, seed=a.seed, threads=a.threads)


if __name__ == "__main__":
    main()
