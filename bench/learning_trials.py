"""Research harness: what makes a tiny random LLaVA ground on the `shapes` task within CPU minutes?

A plain torch loop around a real `LlavaLlamaForCausalLM` (built by llava_getok.llava.tiny, loaded with
from_pretrained), in-memory `shapes` scenes, GETok box answers (or text coordinates / 1D bins, for
bench/learning.py). Each trial prints and appends one line to bench/results/learning_trials.md:
settings -> Acc@0.5 on held-out scenes, the chance levels, wall time.

    .venv/bin/python bench/learning_trials.py --name base --steps 1000 --train-tower --select-layer -1

The model sees what LLaVA's train() would give it: the vicuna_v1-style prompt "USER: <image>\\n... ASSISTANT:",
the image through LLaVA's own `prepare_inputs_labels_for_multimodal`, loss on the answer tokens only.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import types
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the human's questions.")


@dataclass
class Trial:
    name: str = "trial"
    seed: int = 0
    steps: int = 1000
    batch: int = 16
    lr: float = 1e-3
    warmup: int = 50
    weight_decay: float = 0.0
    clip: float = 1.0  # gradient norm clipping; 0 = none
    schedule: str = "cosine"  # cosine | constant (after warmup)
    # model
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    vision_hidden: int = 32
    vision_layers: int = 2
    image_size: int = 64
    patch: int = 8
    select_layer: int = -2
    train_tower: bool = False
    tower_pos: str = "random"  # random | sincos: 2D sine-cosine patch position embeddings in the tower
    tower_pos_scale: float = 1.0
    projector: str = "mlp2x_gelu"
    system_prompt: bool = False
    # stages
    projector_only_steps: int = 0  # first steps: only projector (+ tower if trainable) + new rows learn
    curriculum_steps: int = 0  # first steps: one shape per image
    # data
    n_min: int = 2
    n_max: int = 4
    p_relation: float = 0.3
    eval_n_min: int = 0  # 0: as n_min; else held-out scenes have eval_n_min..n_max shapes
    train_pool: int = 0  # 0: a fresh scene every sample; else reuse this many scenes
    # answer
    repr: str = "getok"  # getok | text | bins
    grid: int = 8
    rounds: int = 1
    offset_levels: int = 3
    bins: int = 32
    init: str = "mean"  # mean | sincos2d (llava_getok.training.tokens.init_getok_rows: input and output rows)
    grid_weight: float = 0.0  # box-token loss (llava_getok.training.box_loss), as in the GETok trainer
    box_weight: float = 0.0
    sigma: float = 1.0
    # eval
    n_eval: int = 300
    eval_every: int = 0
    threads: int = 1
    curve: list = field(default_factory=list)


# -- data -------------------------------------------------------------------------------------------------

def sample(trial: Trial, split: str, k: int, one_shape: bool = False):
    """Scene k of a split -> (image float32 (3, S, S) normalised, expression, target box normalised (4,),
    every shape's box normalised (n, 4))."""
    from data_converters.shapes import describe, make_scene, scene_rng

    rng = scene_rng(trial.seed if split == "train" else 10_000 + trial.seed, split, k)
    while True:
        lo = trial.eval_n_min if (split == "eval" and trial.eval_n_min) else trial.n_min
        n = (1, 1) if one_shape else (lo, trial.n_max)
        img, objs = make_scene(rng, trial.image_size, n)
        t = int(rng.integers(len(objs)))
        expr = describe(objs, t, rng, trial.p_relation)
        if expr is not None:
            break
    s = trial.image_size
    boxes = np.array([o.box for o in objs], dtype=np.float64) / s
    x = ((img.astype(np.float32) / 255.0 - CLIP_MEAN) / CLIP_STD).transpose(2, 0, 1)
    return x, expr, boxes[t], boxes


def answer_text(box, trial: Trial, cfg) -> str:
    from llava_getok import encode_box

    if trial.repr == "getok":
        return encode_box(box, cfg)
    if trial.repr == "text":  # LLaVA-1.5 style: 2 decimals in [0, 1]
        return "[" + ", ".join(f"{v:.2f}" for v in box) + "]"
    if trial.repr == "bins":
        q = np.minimum(np.floor(np.asarray(box) * trial.bins), trial.bins - 1).astype(int)
        return "".join(f"<loc{v:03d}>" for v in q)
    raise ValueError(trial.repr)


def new_tokens(trial: Trial, cfg) -> list[str]:
    if trial.repr == "getok":
        return list(cfg.tokens())
    if trial.repr == "bins":
        return [f"<loc{v:03d}>" for v in range(trial.bins)]
    return []


# -- model ------------------------------------------------------------------------------------------------

def build(trial: Trial, work: Path):
    import torch
    from llava.model import LlavaLlamaForCausalLM
    from transformers import AddedToken, AutoTokenizer

    from llava_getok.llava.tiny import TinyLlavaConfig, build_tiny_llava, train_tokenizer

    tcfg = TinyLlavaConfig(hidden_size=trial.hidden, intermediate_size=2 * trial.hidden, num_layers=trial.layers,
                           num_heads=trial.heads, vision_hidden_size=trial.vision_hidden,
                           vision_layers=trial.vision_layers, image_size=trial.image_size, patch_size=trial.patch,
                           mm_projector_type=trial.projector, mm_vision_select_layer=trial.select_layer,
                           seed=trial.seed)
    key = "-".join(str(v) for v in tcfg.__dict__.values())
    tok_dir = work / "tokenizer"
    if not (tok_dir / "tokenizer.model").exists():
        train_tokenizer(tok_dir)
    mdir = work / f"llava-{key}"
    if not (mdir / "config.json").exists():
        build_tiny_llava(mdir, tok_dir, tcfg)
    tok = AutoTokenizer.from_pretrained(mdir, use_fast=False)
    model = LlavaLlamaForCausalLM.from_pretrained(mdir)
    tower = model.get_vision_tower()
    if not tower.is_loaded:
        tower.load_model()
    from llava_getok import GETokConfig

    cfg = GETokConfig(grid=trial.grid, rounds=trial.rounds, offset_levels=trial.offset_levels,
                      mode="inline" if trial.rounds else "grid")
    toks = new_tokens(trial, cfg)
    old = len(tok)
    if toks:
        tok.add_tokens([AddedToken(t, normalized=False, special=True, lstrip=False, rstrip=False) for t in toks],
                       special_tokens=True)
        model.resize_token_embeddings(len(tok), mean_resizing=False)
        if trial.repr == "getok":
            from llava_getok.training.tokens import init_getok_rows

            init_getok_rows(model, tok.convert_tokens_to_ids(toks), cfg, trial.init, n_old=old)
        else:
            emb, head = model.get_input_embeddings().weight.data, model.get_output_embeddings().weight.data
            emb[old:] = emb[:old].mean(0)
            head[old:] = head[:old].mean(0)
    if trial.tower_pos == "sincos":
        set_sincos_positions(tower.vision_tower, trial.tower_pos_scale)
    if trial.train_tower:
        tower.vision_tower.requires_grad_(True)
        tower.forward = types.MethodType(type(tower).forward.__wrapped__, tower)  # LLaVA's is @torch.no_grad()
    model.config.tokenizer_padding_side = "right"
    return model, tok, cfg


def set_sincos_positions(clip_vision_model, scale: float = 1.0):
    """Overwrite a CLIP tower's patch position embeddings with 2D sine-cosine codes of norm ~``scale``
    per dimension (CLS position: zeros). Random CLIP position embeddings (std 0.02) are ~14x smaller
    than the patch content, and a random tower does not learn to use them within minutes."""
    import torch

    pe = clip_vision_model.vision_model.embeddings.position_embedding.weight
    side = int(round((pe.shape[0] - 1) ** 0.5))
    with torch.no_grad():
        pe[1:] = torch.as_tensor(sincos2d(side, pe.shape[1]), dtype=pe.dtype) * scale
        pe[0] = 0


def sincos2d(n: int, dim: int) -> np.ndarray:
    """(n*n, dim) 2D sine-cosine features of cell (i, j), row-major like cfg.grid_tokens."""
    q = dim // 4
    freq = 1.0 / (100.0 ** (np.arange(q) / q))
    j, i = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    i, j = i.reshape(-1, 1) * freq, j.reshape(-1, 1) * freq
    out = np.concatenate([np.sin(i), np.cos(i), np.sin(j), np.cos(j)], 1)
    return np.pad(out, ((0, 0), (0, dim - out.shape[1])))


def prompt_ids(tok, expr: str, system: bool):
    from llava.constants import IMAGE_TOKEN_INDEX
    from llava.mm_utils import tokenizer_image_token

    head = (SYSTEM + " ") if system else ""
    text = f"{head}USER: <image>\nWhere is {expr}? Answer with a box. ASSISTANT:"
    return tokenizer_image_token(text, tok, IMAGE_TOKEN_INDEX)


def answer_ids(tok, text: str, trial: Trial) -> list[int]:
    if trial.repr == "text":
        ids = tok(text, add_special_tokens=False).input_ids
    else:  # one id per special token, never through the slow tokenizer's text path
        from llava_getok.vocab import TOKEN_RE
        import re

        parts = re.findall(r"<loc\d+>", text) if trial.repr == "bins" else [m.group(0) for m in TOKEN_RE.finditer(text)]
        ids = tok.convert_tokens_to_ids(parts)
    return ids + [tok.eos_token_id]


def batch_tensors(items, pad_id, left=False):
    import torch

    L = max(len(ids) for ids, _ in items)
    ids = torch.full((len(items), L), pad_id, dtype=torch.long)
    labels = torch.full((len(items), L), -100, dtype=torch.long)
    mask = torch.zeros((len(items), L), dtype=torch.bool)
    for r, (x, y) in enumerate(items):
        sl = slice(L - len(x), L) if left else slice(0, len(x))
        ids[r, sl] = torch.as_tensor(x)
        labels[r, sl] = torch.as_tensor(y)
        mask[r, sl] = True
    return ids, labels, mask


# -- evaluation -------------------------------------------------------------------------------------------

def box_iou(a, b):
    a, b = np.asarray(a, float), np.asarray(b, float)
    iw = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    ih = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = iw * ih
    area = lambda z: (z[..., 2] - z[..., 0]) * (z[..., 3] - z[..., 1])
    return inter / np.maximum(area(a) + area(b) - inter, 1e-12)


def decode_boxes(model, tok, cfg, trial: Trial, evalset, bs=100):
    """Greedy decoding, constrained to the answer grammar for getok/bins; free greedy for text.
    Returns (boxes (N, 4) with NaN for parse failures, tokens generated per answer)."""
    import torch

    from llava_getok import parse

    out, n_tok = [], []
    model.config.tokenizer_padding_side = "left"
    try:
        for s in range(0, len(evalset), bs):
            chunk = evalset[s:s + bs]
            items = [(prompt_ids(tok, e, trial.system_prompt), [-100]) for _, e, _, _ in chunk]
            ids, _, mask = batch_tensors([(x, [-100] * len(x)) for x, _ in items], tok.pad_token_id, left=True)
            images = torch.as_tensor(np.stack([x for x, _, _, _ in chunk]))
            with torch.no_grad():
                _, _, att, _, emb, _ = model.prepare_inputs_labels_for_multimodal(ids, None, mask, None, None, images)
                steps = plan(tok, cfg, trial)
                chosen = []
                embed = model.get_input_embeddings()
                for allowed in steps:
                    logits = model.get_model()(inputs_embeds=emb, attention_mask=att).last_hidden_state[:, -1]
                    logits = model.lm_head(logits)
                    if allowed is not None:
                        sub = torch.full_like(logits, -1e9)
                        sub[:, allowed] = logits[:, allowed]
                        logits = sub
                    nxt = logits.argmax(-1)
                    chosen.append(nxt)
                    emb = torch.cat([emb, embed(nxt)[:, None]], 1)
                    att = torch.cat([att, torch.ones_like(att[:, :1])], 1)
            gen = torch.stack(chosen, 1).tolist()
            for row in gen:
                if tok.eos_token_id in row:
                    row = row[:row.index(tok.eos_token_id)]
                n_tok.append(len(row))
                out.append(to_box(tok, cfg, trial, row))
    finally:
        model.config.tokenizer_padding_side = "right"
    return np.array(out, dtype=np.float64), np.array(n_tok)


def plan(tok, cfg, trial: Trial):
    """Allowed token ids per decoding step (None = any): the grammar of one box answer."""
    ids = tok.convert_tokens_to_ids
    if trial.repr == "getok":
        grid = ids(list(cfg.grid_tokens))
        off = ids(list(cfg.offset_tokens))
        point = [grid] + [off] * cfg.inline_rounds
        return [[ids("<box>")]] + point + point + [[ids("</box>")]]
    if trial.repr == "bins":
        return [ids([f"<loc{v:03d}>" for v in range(trial.bins)])] * 4
    return [None] * 28


def to_box(tok, cfg, trial: Trial, row):
    from llava_getok import parse

    if trial.repr == "getok":
        r = parse("".join(tok.convert_ids_to_tokens(row)), cfg)
        b = r.boxes()
        return b[0] if (b and not r.errors) else (math.nan,) * 4
    if trial.repr == "bins":
        v = [int(t[4:-1]) for t in tok.convert_ids_to_tokens(row) if t.startswith("<loc")]
        return tuple((np.array(v[:4]) + 0.5) / trial.bins) if len(v) >= 4 else (math.nan,) * 4
    import re

    nums = re.findall(r"\d*\.\d+|\d+", tok.decode(row, skip_special_tokens=True))
    if len(nums) < 4:
        return (math.nan,) * 4
    b = np.clip(np.array([float(v) for v in nums[:4]]), 0, 1)
    return tuple(b) if b[2] >= b[0] and b[3] >= b[1] else (math.nan,) * 4


def evaluate(model, tok, cfg, trial, evalset):
    pred, n_tok = decode_boxes(model, tok, cfg, trial, evalset)
    gt = np.stack([b for _, _, b, _ in evalset])
    iou = np.nan_to_num(box_iou(pred, gt), nan=0.0)
    fail = np.isnan(pred).any(1)
    return {"acc50": float((iou >= 0.5).mean()), "acc80": float((iou >= 0.8).mean()), "miou": float(iou.mean()),
            "parse_fail": float(fail.mean()), "tokens": float(n_tok.mean())}


def chance(evalset, train_mean_box):
    """Acc@0.5 of (a) the box of a random shape in the image (expected), (b) the mean training box."""
    rand = np.mean([np.mean(box_iou(boxes, b) >= 0.5) for _, _, b, boxes in evalset])
    mean = np.mean([box_iou(train_mean_box, b) >= 0.5 for _, _, b, _ in evalset])
    return float(rand), float(mean)


def lm_loss(model, ids, mask, labels, images, table, trial: Trial):
    """LLaVA's loss (image tokens spliced in by its own code), plus the GETok box-token loss when asked."""
    import torch.nn.functional as F

    _, _, att, _, emb, lab = model.prepare_inputs_labels_for_multimodal(ids, None, mask, None, labels, images)
    logits = model.lm_head(model.get_model()(inputs_embeds=emb, attention_mask=att).last_hidden_state)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), lab[:, 1:].reshape(-1), ignore_index=-100)
    if table is not None:
        from llava_getok.training.box_loss import box_token_loss
        from llava_getok.training.loss_parts import Targets

        parts = box_token_loss(logits, Targets.of(lab), table, sigma=trial.sigma, with_box=trial.box_weight > 0)
        loss = loss + trial.grid_weight * parts["grid"] + trial.box_weight * parts["box"]
    return loss


# -- training ---------------------------------------------------------------------------------------------

def run(trial: Trial, work: Path, log: Path | None = None, verbose=True):
    import torch

    torch.set_num_threads(trial.threads)
    torch.manual_seed(trial.seed)
    t0 = time.time()
    model, tok, cfg = build(trial, work)
    evalset = [sample(trial, "eval", k) for k in range(trial.n_eval)]
    # optimiser: everything trainable (the tower only when asked), no decay on norms/embeddings
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=trial.lr, weight_decay=trial.weight_decay, betas=(0.9, 0.98))
    def lr_at(s):
        decay = 1.0 if trial.schedule == "constant" else 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, trial.steps))))
        return min(1.0, (s + 1) / max(1, trial.warmup)) * decay

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    table = None
    if trial.repr == "getok" and (trial.grid_weight or trial.box_weight):
        from llava_getok.training.box_loss import TokenTable

        table = TokenTable.from_ids(cfg, tok.convert_tokens_to_ids(list(cfg.tokens())))
    proj_only = [p for n, p in model.named_parameters() if "mm_projector" in n or "vision_tower" in n]
    pool = trial.train_pool or None
    train_boxes, k, losses = [], 0, []
    model.train()
    t_train = time.time()
    for step in range(trial.steps):
        stage_proj = step < trial.projector_only_steps
        for p in params:
            p.requires_grad_(not stage_proj or any(p is q for q in proj_only))
        one = step < trial.curriculum_steps
        items, imgs = [], []
        for _ in range(trial.batch):
            idx = k % pool if pool else k
            x, expr, box, _ = sample(trial, "train" if not one else "train1", idx, one_shape=one)
            k += 1
            train_boxes.append(box)
            p = prompt_ids(tok, expr, trial.system_prompt)
            a = answer_ids(tok, answer_text(box, trial, cfg), trial)
            items.append((p + a, [-100] * len(p) + a))
            imgs.append(x)
        ids, labels, mask = batch_tensors(items, tok.pad_token_id)
        loss = lm_loss(model, ids, mask, labels, torch.as_tensor(np.stack(imgs)), table, trial)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if trial.clip:
            torch.nn.utils.clip_grad_norm_(params, trial.clip)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if verbose and (step + 1) % 100 == 0:
            print(f"[{trial.name}] step {step + 1}/{trial.steps} loss {np.mean(losses[-100:]):.3f} "
                  f"{(step + 1) / (time.time() - t_train):.1f} it/s", flush=True)
        if trial.eval_every and (step + 1) % trial.eval_every == 0 and step + 1 < trial.steps:
            model.eval()
            m = evaluate(model, tok, cfg, trial, evalset[: min(len(evalset), 200)])
            trial.curve.append((step + 1, time.time() - t_train, m["acc50"], m["miou"]))
            if verbose:
                print(f"[{trial.name}] step {step + 1}: Acc@0.5 {m['acc50']:.3f} mIoU {m['miou']:.3f}", flush=True)
            model.train()
    train_s = time.time() - t_train
    model.eval()
    t_eval = time.time()
    m = evaluate(model, tok, cfg, trial, evalset)
    m["eval_s"] = time.time() - t_eval
    trial.curve.append((trial.steps, train_s, m["acc50"], m["miou"]))
    rand, mean = chance(evalset, np.mean(train_boxes, 0))
    m.update(chance_random_shape=rand, chance_mean_box=mean, train_s=train_s, total_s=time.time() - t0,
             final_loss=float(np.mean(losses[-50:])))
    if verbose:
        print(json.dumps({"trial": trial.__dict__, "result": m}), flush=True)
    if log is not None:
        append_log(log, trial, m)
    return m


DEFAULTS = Trial()


def append_log(log: Path, trial: Trial, m: dict):
    diff = {k: v for k, v in trial.__dict__.items() if k not in ("name", "curve", "n_eval", "eval_every", "threads")
            and v != getattr(DEFAULTS, k)}
    line = (f"| {trial.name} | {' '.join(f'{k}={v}' for k, v in diff.items())} | {m['acc50']:.3f} | {m['acc80']:.3f} | "
            f"{m['miou']:.3f} | {m['chance_random_shape']:.3f} / {m['chance_mean_box']:.3f} | {m['final_loss']:.3f} | "
            f"{m['train_s']:.0f} |\n")
    log.parent.mkdir(parents=True, exist_ok=True)
    if not log.exists():
        log.write_text("# Learning trials (bench/learning_trials.py)\n\nDefaults: " + json.dumps(
            {k: v for k, v in DEFAULTS.__dict__.items() if k != "curve"}) +
            "\n\n| trial | settings (vs defaults) | Acc@0.5 | Acc@0.8 | mIoU | chance rand-shape / mean-box | loss | train s |\n"
            "|---|---|---|---|---|---|---|---|\n")
    with open(log, "a") as f:
        f.write(line)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for k, v in DEFAULTS.__dict__.items():
        if k == "curve":
            continue
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            ap.add_argument(flag, action="store_true", default=v)
        else:
            ap.add_argument(flag, type=type(v), default=v)
    ap.add_argument("--work", default=os.environ.get("GETOK_TRIALS_WORK", "/tmp/getok_trials"))
    ap.add_argument("--log", default=str(ROOT / "bench" / "results" / "learning_trials.md"))
    args = vars(ap.parse_args(argv))
    work, log = Path(args.pop("work")), Path(args.pop("log"))
    work.mkdir(parents=True, exist_ok=True)
    run(Trial(**args), work, log)


if __name__ == "__main__":
    main()
