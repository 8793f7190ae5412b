"""Step time of LLaVA training with the GETok hooks and box-token loss on, against plain LLaVA, same tiny model.

Both trainers run on one model and one batch (real COCO boxes as GETok answers), interleaved step by step
so that machine load hits both alike; the ratio is the median GETok step over the median plain step, measured
in this one run. A step is forward + backward (LLaVA's compute_loss, then loss.backward()), timed in CPU
time of this process (wall time on a shared machine is dominated by other jobs).

With the box-token loss on, the GETok trainer scores the LM loss on the labelled positions only and LLaMA's
forward skips its full-length logits (llava_getok.training.step.labelled_lm_loss), which saves more than the box-token loss costs.
The "full logits kept" row runs the GETok trainer on LLaVA's full logits instead (its path when the outputs are
returned, as in evaluation): that ratio is the cost of the hooks and the box-token loss alone.

    python bench/train_overhead.py [--steps 30] [--batch 4] [--threads 2]

Prints a markdown table and writes it to bench/results/train_overhead.md. Target: ratio <= 1.05.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO / "tests" / "fixtures" / "data"  # real COCO-mini data shipped with the repository


MODELS = {  # name -> TinyLlavaConfig fields
    "tiny": {},  # LLaMA 64 x 2 layers, CLIP 32 px / 8 px patches (16 image tokens): the tests' model
    "demo": {"image_size": 64, "num_layers": 3},  # the embedded demo's model: 64 image tokens, 3 layers
}


def build(tmp: Path, batch: int, lora: bool, size: str = "tiny"):
    """Tiny LLaVA + GETok tokens (as LLaVA's train() hands them to the trainer), one batch."""
    import llava_getok as gt

    gt.register()
    from llava.model import LlavaLlamaForCausalLM
    from llava.train.train import TrainingArguments
    from transformers import AutoTokenizer

    from llava_getok.llava.tiny import (TinyLlavaConfig, build_tiny_llava, make_grounding_data, supervised_data_module,
                                        train_tokenizer)

    cfg = gt.GETokConfig(grid=32)
    model_dir = tmp / f"tiny-llava-{size}"
    if not model_dir.exists():
        if not (tmp / "tok").exists():
            train_tokenizer(tmp / "tok")
        build_tiny_llava(model_dir, tmp / "tok", TinyLlavaConfig(**MODELS[size]))
    data = tmp / f"data-{batch}" / "data.json"
    if not data.exists():
        make_grounding_data(data.parent, SHARED / "coco_mini", cfg,
                            n_records=batch)
    tok = AutoTokenizer.from_pretrained(model_dir, use_fast=False, model_max_length=512, padding_side="right")
    tok.pad_token = tok.unk_token
    model = LlavaLlamaForCausalLM.from_pretrained(model_dir)
    model.get_model().get_vision_tower().load_model()
    model.config.use_cache = False
    if lora:
        from peft import LoraConfig, get_peft_model

        from llava.train.train import find_all_linear_names

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=find_all_linear_names(model),
                                                 lora_dropout=0.0, task_type="CAUSAL_LM"))
    module = supervised_data_module(tok, model, data)
    args = TrainingArguments(output_dir=str(tmp / "out"), report_to="none", use_cpu=True, lora_enable=lora,
                             per_device_train_batch_size=batch)
    return model, tok, module, args, cfg


def timed(fn) -> float:
    """CPU time of this process (all its threads): other jobs on a shared machine barely move it."""
    t = time.process_time()
    fn()
    return time.process_time() - t


def measure(tmp: Path, steps: int, batch: int, lora: bool, weights: tuple[float, float], size: str = "tiny",
            full_logits: bool = False):
    import llava_getok as gt

    gt.register()  # before llava.train is imported (compat fix for transformers >= 4.53)
    from llava.train.llava_trainer import LLaVATrainer

    from llava_getok.training.settings import GETokSettings
    from llava_getok.llava.trainer import GETokTrainer

    model, tok, module, args, cfg = build(tmp, batch, lora, size)
    getok = GETokTrainer(model=model, tokenizer=tok, args=args, **module,
                         settings=GETokSettings(grid=cfg.grid, grid_weight=weights[0], box_weight=weights[1]))
    plain = LLaVATrainer(model=model, tokenizer=tok, args=args, **module)  # same model, GETok rows included
    ds = module["train_dataset"]
    batch_inputs = module["data_collator"]([ds[i] for i in range(min(batch, len(ds)))])
    model.train()

    def step(trainer):
        if full_logits and trainer is getok:  # returning the outputs keeps LLaVA's full logits
            loss = trainer.compute_loss(model, dict(batch_inputs), return_outputs=True)[0]
        else:
            loss = trainer.compute_loss(model, dict(batch_inputs))
        loss.backward()
        model.zero_grad(set_to_none=True)

    for _ in range(3):  # warm-up
        step(plain), step(getok)
    t_plain, t_getok = [], []
    for i in range(steps):
        order = (plain, getok) if i % 2 == 0 else (getok, plain)
        for trainer in order:
            (t_plain if trainer is plain else t_getok).append(timed(lambda: step(trainer)))
    return statistics.median(t_plain), statistics.median(t_getok)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for name, lora, weights, size, batch, full_logits in (
                ("tiny, full, loss on (0.5, 0.5)", False, (0.5, 0.5), "tiny", a.batch, False),
                ("tiny, full, loss on, full logits kept", False, (0.5, 0.5), "tiny", a.batch, True),
                ("tiny, full, loss off (0, 0)", False, (0.0, 0.0), "tiny", a.batch, False),
                ("tiny, LoRA + GETok rows, loss on", True, (0.5, 0.5), "tiny", a.batch, False),
                ("demo model, full, loss on", False, (0.5, 0.5), "demo", 16, False)):
            plain, getok = measure(tmp, a.steps, batch, lora, weights, size, full_logits)
            rows.append((name, batch, plain * 1e3, getok * 1e3, getok / plain))
    table = ["| configuration | batch | plain LLaVA CPU ms/step | GETok CPU ms/step | ratio |", "|---|---|---|---|---|"]
    table += [f"| {n} | {b} | {p:.1f} | {g:.1f} | {r:.3f} |" for n, b, p, g, r in rows]
    info = (f"\ntiny: LLaMA 64 x 2 layers, CLIP 32 px (16 image tokens); demo model: LLaMA 64 x 3 layers, CLIP 64 px "
            f"(64 image tokens), as `llava-getok demo` trains it. GETok grid 32 (1042 tokens added), getok_v1 template, "
            f"COCO boxes, {a.steps} interleaved steps (median), forward + backward, {a.threads} threads, torch "
            f"{torch.__version__}, {platform.processor() or platform.machine()}. Target ratio <= 1.05.\n"
            f"Reproduce: `python bench/train_overhead.py --steps {a.steps} --batch {a.batch} --threads {a.threads}`\n")
    text = "\n".join(table) + "\n" + info
    print(text)
    from llava_getok.atomic import write_text_atomic

    write_text_atomic(REPO / "bench" / "results" / "train_overhead.md",
                      "# Training step overhead of the GETok hooks\n\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
