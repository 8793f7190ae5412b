"""GETok against plain LLaVA at LLaVA-1.5-7B's shapes: step time, peak memory and checkpoint bytes.

The model is LLaVA-1.5-7B's layout cut to a few decoder layers (LLaMA hidden 4096, MLP 11008, 32 heads, a
32,000-piece LLaMA-layout vocabulary + the 1042 GETok tokens of grid 32) with CLIP ViT-L/14-336 cut to as many
layers (576 image tokens, LLaVA's mlp2x_gelu projector), random weights; the batch is real COCO referring
records (tests/fixtures) at LLaVA's lengths (system prompt + 576 image tokens + question + GETok answer).
Every cell of the table is a process of its own, which loads the model as LLaVA's train() does and runs training
steps (forward, backward, AdamW) with one trainer:

- plain LLaVA: LLaVA's own trainer (its loss on the full logits) on the same model and batch;
- GETok: the GETok trainer (box-token loss on, the LM loss on the labelled positions, GETok-row deltas under
  LoRA).

Step time is the median CPU time of the process per step (robust to other jobs on a shared machine) on a CPU, or
wall time on CUDA; peak memory is the peak of what torch allocates during the steps above what was allocated
before them (model and optimiser state), exact on both devices (class PeakMemory), in one more step after the timed
ones. float32 and bf16 (bf16 weights + autocast, as LLaVA's train() runs ``--bf16 True``), full fine-tuning and
LoRA (LLaVA's r=128, alpha=256).

    python bench/real_shapes.py [--layers 2] [--batch 2] [--steps 3] [--device cpu|cuda]

Prints a markdown table and writes it to bench/results/real_shapes.md. Targets: GETok <= 1.05x plain LLaVA's step
time and <= 1.0x its peak memory.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COCO = REPO / "tests" / "fixtures" / "data" / "coco_mini"
LLAMA_7B = {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32, "num_key_value_heads": 32,
            "max_position_embeddings": 4096, "rms_norm_eps": 1e-5}
CLIP_L_336 = {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16, "image_size": 336,
              "patch_size": 14, "projection_dim": 768}
GRID = 32


def llama_vocabulary(out: Path) -> Path:
    """A slow LlamaTokenizer folder with LLaMA's layout and size: 32,000 pieces, <unk> <s> </s> = 0 1 2, byte
    fallback. A BPE trained here on a synthetic corpus: the benchmark needs the vocabulary's size and layout
    (embedding rows, LM-head width, where the GETok ids start), not its language."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    freq = [12, 9, 8, 7.5, 7, 6.7, 6.3, 6, 5.9, 4.3, 4, 2.8, 2.8, 2.4, 2.4, 2.2, 2, 2, 1.9, 1.5, 1, 0.8, 0.15, 0.15,
            0.1, 0.07]
    words = ["".join(rng.choices(letters, freq, k=rng.randint(2, 10))) for _ in range(60000)]
    words += "USER ASSISTANT A chat between a curious human and an artificial intelligence assistant".split()
    lines = [" ".join(rng.choices(words, k=rng.randint(5, 20))) for _ in range(60000)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, vocab_size=32000,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1,
                                   eos_id=2, pad_id=-1, user_defined_symbols=["USER"], num_threads=2, minloglevel=2)
    (out / "tokenizer.model").write_bytes(model.getvalue())
    tok = LlamaTokenizer(vocab_file=str(out / "tokenizer.model"), legacy=False)
    assert len(tok) == 32000, len(tok)
    tok.pad_token = tok.unk_token
    tok.save_pretrained(out)
    return out


def build(tmp: Path, layers: int, n_records: int) -> tuple[Path, Path]:
    """(model folder, data file): the cut LLaVA-1.5-7B saved with LLaVA's layout, and the COCO records."""
    import llava_getok as gt
    from llava_getok.llava.tiny import TinyLlavaConfig, build_tiny_llava, make_grounding_data

    tok = llama_vocabulary(tmp / "tokenizer")
    cfg = TinyLlavaConfig(hidden_size=LLAMA_7B["hidden_size"], intermediate_size=LLAMA_7B["intermediate_size"],
                          num_layers=layers, num_heads=LLAMA_7B["num_attention_heads"],
                          vision_hidden_size=CLIP_L_336["hidden_size"], vision_layers=layers,
                          vision_heads=CLIP_L_336["num_attention_heads"], image_size=CLIP_L_336["image_size"],
                          patch_size=CLIP_L_336["patch_size"], max_position_embeddings=LLAMA_7B["max_position_embeddings"],
                          vision_intermediate_size=CLIP_L_336["intermediate_size"])
    model = build_tiny_llava(tmp / "llava-v1.5-7b-cut", tok, cfg)
    data = make_grounding_data(tmp / "data", COCO, gt.GETokConfig(grid=GRID), n_records=n_records)
    return model, data


class PeakMemory:
    """Peak memory torch allocates during a block, above what was allocated when it began: on CUDA torch's own
    peak statistic; on a CPU the largest "Total Allocated" of the profiler's memory events (every allocation and
    free of torch's CPU allocator in the block, so the peak is exact, not sampled)."""

    def __init__(self, device: str):
        self.device, self.peak = device, 0

    def __enter__(self):
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            from torch.profiler import ProfilerActivity, profile

            self._profile = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self._profile.__enter__()
        return self

    def __exit__(self, *exc):
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
            return
        self._profile.__exit__(*exc)
        with tempfile.TemporaryDirectory() as d:
            trace = Path(d) / "trace.json"
            self._profile.export_chrome_trace(str(trace))
            events = json.loads(trace.read_text())["traceEvents"]
        self.peak = max((e["args"]["Total Allocated"] for e in events
                         if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0), default=0)


def worker(job: dict) -> dict:
    """One cell: load as LLaVA's train() does, train ``steps`` steps with one trainer, measure."""
    import torch

    import llava_getok as gt

    gt.register()
    from llava.model import LlavaLlamaForCausalLM
    from llava.train.llava_trainer import LLaVATrainer
    from llava.train.train import TrainingArguments, find_all_linear_names
    from transformers import AutoTokenizer

    from llava_getok.training.sidecar import ROWS_FILE, save_tensors_atomic
    from llava_getok.training.rows import getok_rows_values
    from llava_getok.training.tokens import add_getok_tokens, init_getok_rows, resize_embeddings
    from llava_getok.training.settings import GETokSettings
    from llava_getok.llava.tiny import supervised_data_module
    from llava_getok.llava.trainer import GETokTrainer

    torch.manual_seed(0)
    device, bf16, lora, getok = job["device"], job["precision"] == "bf16", job["mode"] == "lora", job["trainer"] == "GETok"
    dtype = torch.bfloat16 if bf16 else torch.float32
    model_dir, data = Path(job["model"]), Path(job["data"])
    tok = AutoTokenizer.from_pretrained(model_dir, use_fast=False, model_max_length=2048, padding_side="right")
    tok.pad_token = tok.unk_token
    model = LlavaLlamaForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model.get_model().get_vision_tower().load_model()
    model.get_vision_tower().to(dtype)
    model.config.use_cache = False
    cfg = gt.GETokConfig(grid=GRID)
    if not getok:  # plain LLaVA on the same vocabulary: the GETok tokens and rows, LLaVA's trainer and loss
        ids = add_getok_tokens(tok, cfg)
        init_getok_rows(model, ids, cfg, n_old=resize_embeddings(model, len(tok)))
    if lora:  # as LLaVA's train(): the LoRA adapters before the trainer
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=128, lora_alpha=256, target_modules=find_all_linear_names(model),
                                                 lora_dropout=0.05, task_type="CAUSAL_LM"))
        model.get_base_model().get_model().mm_projector.requires_grad_(True)
    model.to(device)
    module = supervised_data_module(tok, model, data)
    args = TrainingArguments(output_dir=job["out"], report_to="none", use_cpu=device == "cpu", lora_enable=lora,
                             bf16=bf16, per_device_train_batch_size=job["batch"])
    if getok:
        trainer = GETokTrainer(model=model, tokenizer=tok, args=args, settings=GETokSettings(grid=GRID, check_data=0),
                               **module)
    else:
        trainer = LLaVATrainer(model=model, tokenizer=tok, args=args, **module)
    ds = module["train_dataset"]
    batch = module["data_collator"]([ds[i] for i in range(job["batch"])])
    batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
    batch["images"] = batch["images"].to(dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    model.train()

    def step():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            loss = trainer.compute_loss(model, dict(batch))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: the optimiser's state exists from here on, as in any run past step 1
    times = []
    for _ in range(job["steps"]):
        if device == "cuda":
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0 if device == "cuda" else time.process_time() - c0)
    with PeakMemory(device) as memory:  # a step of its own: the profiler would slow the timed ones
        step()
    result = {"step_s": statistics.median(times), "peak_bytes": memory.peak,
              "seq_len": int(batch["input_ids"].shape[1]) + 575, "trainable": sum(p.numel() for p in params)}
    if lora and getok:  # what a LoRA checkpoint holds: the adapter (LLaVA's LoRA layers) + the GETok rows file
        out = Path(job["out"])
        model.save_pretrained(out, save_embedding_layers=False)
        ids = trainer.getok.ids
        save_tensors_atomic(out / ROWS_FILE, getok_rows_values(model.get_base_model(), ids))
        result["adapter_bytes"] = sum(f.stat().st_size for f in out.glob("adapter_model.*"))
        result["rows_bytes"] = (out / ROWS_FILE).stat().st_size
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=2, help="decoder layers (and CLIP layers) kept")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="measured steps after one warm-up step")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--modes", default="full,lora")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        import torch

        torch.set_num_threads(a.threads)
        print("RESULT " + json.dumps(worker(json.loads(a.worker))))
        return 0
    rows = []
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        model, data = build(tmp, a.layers, a.batch)
        for precision in a.precisions.split(","):
            for mode in a.modes.split(","):
                cell = {}
                for trainer in ("plain LLaVA", "GETok"):
                    job = {"model": str(model), "data": str(data), "device": a.device, "precision": precision,
                           "mode": mode, "trainer": trainer, "batch": a.batch, "steps": a.steps,
                           "out": str(tmp / f"out-{precision}-{mode}-{trainer.split()[0]}")}
                    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job), "--threads",
                                           str(a.threads)], capture_output=True, text=True, env=env)
                    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
                    if proc.returncode or line is None:
                        print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
                        raise SystemExit(f"real_shapes: the {precision} {mode} {trainer} run failed")
                    cell[trainer] = json.loads(line[len("RESULT "):])
                    print(f"{precision} {mode} {trainer}: {cell[trainer]}", file=sys.stderr, flush=True)
                rows.append((precision, mode, cell["plain LLaVA"], cell["GETok"]))
    gib = 2**30
    table = ["| precision | mode | plain LLaVA s/step | GETok s/step | time ratio | plain LLaVA peak GiB | GETok peak GiB "
             "| memory ratio |", "|---|---|---|---|---|---|---|---|"]
    for precision, mode, plain, getok in rows:
        table.append(f"| {precision} | {mode} | {plain['step_s']:.2f} | {getok['step_s']:.2f} | "
                     f"{getok['step_s'] / plain['step_s']:.3f} | {plain['peak_bytes'] / gib:.2f} | "
                     f"{getok['peak_bytes'] / gib:.2f} | {getok['peak_bytes'] / plain['peak_bytes']:.3f} |")
    lora = next((g for _, m, _, g in rows if m == "lora" and "rows_bytes" in g), None)
    sizes = (f"LoRA checkpoint: adapter {lora['adapter_bytes'] / 2**20:.1f} MiB + getok_rows.safetensors "
             f"{lora['rows_bytes'] / 2**20:.1f} MiB.\n" if lora else "")
    import torch

    seq = rows[0][3]["seq_len"]
    info = (f"\nLLaVA-1.5-7B layout cut to {a.layers} decoder layers (4096 wide, MLP 11008, 32 heads, vocabulary 32000 + "
            f"1042 GETok tokens) and CLIP ViT-L/14-336 cut to {a.layers} layers (576 image tokens), random weights; "
            f"batch {a.batch} of COCO referring records, {seq} positions a sequence. One process per cell, "
            f"{a.steps} steps after a warm-up (forward, backward, AdamW), median "
            f"{'CPU' if a.device == 'cpu' else 'wall'} time; peak memory: what torch allocates during one more step above what "
            f"was allocated before it (model and optimiser state). {a.device}, "
            f"{a.threads} threads, torch {torch.__version__}, {platform.processor() or platform.machine()}.\n"
            f"{sizes}Targets: time ratio <= 1.05, memory ratio <= 1.0.\n"
            f"Reproduce: `python bench/real_shapes.py --layers {a.layers} --batch {a.batch} --steps {a.steps} "
            f"--device {a.device} --precisions {a.precisions} --modes {a.modes}`\n")
    text = "\n".join(table) + "\n" + info
    print(text)
    from llava_getok.atomic import write_text_atomic

    name = "real_shapes" + ("" if a.precisions == "fp32,bf16" else "_" + a.precisions.replace(",", "_")) + \
        ("" if a.device == "cpu" else "_" + a.device)
    write_text_atomic(REPO / "bench" / "results" / f"{name}.md",
                      "# GETok at LLaVA-1.5-7B's shapes\n\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
