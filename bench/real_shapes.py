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

``--family qwen2.5-vl``: the same comparison for the transformers-native backend at Qwen2.5-VL-7B's layout (Qwen2
hidden 3584, MLP 18944, 28 heads / 4 key-value heads, 152,064 untied embedding and LM-head rows for a 151,665-token
vocabulary, + the 1042 GETok tokens; its windowed ViT at full width, 1280 wide, 16 heads, patch 14, merge 2, out 3584),
both cut to ``--layers`` blocks, random weights built from config objects. The batch is the same COCO records at the
7B processor's pixel range (min_pixels 3136, max_pixels 12845056). Each cell is ``python -m llava_getok.hf.train``'s
own path (``build`` -> trl's SFTTrainer -> ``Trainer.train``) in a process of its own:

- plain Qwen2.5-VL: the same questions with Qwen2.5-VL's own JSON answer (``qwen25`` format: no tokens added, trl's
  own loss), LoRA r=64 / alpha 128 on the language model;
- GETok: GETok answers (grid 32), the box-token loss on, the GETok rows as peft trainable tokens beside the same LoRA.

Step time and peak memory are measured as for LLaVA, from trainer callbacks around each optimiser step (forward,
backward, clipping, AdamW); also the process's peak RSS and the memory the row mechanism adds (one forward + backward
of the embedding and LM head on the step's positions, peft's trainable-token layers against the frozen layers alone).
Full fine-tuning runs only where its AdamW state fits the machine's memory (else the table says why). Writes
bench/results/real_shapes_qwen.md. ``--layout tiny`` runs the same path on a tiny model (the test's).
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
# Qwen2.5-VL-7B-Instruct's config.json (text and vision) and processor
QWEN25_7B_TEXT = {"hidden_size": 3584, "intermediate_size": 18944, "num_attention_heads": 28, "num_key_value_heads": 4,
                  "max_position_embeddings": 128000, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
                  "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "sliding_window": 32768,
                  "use_sliding_window": False, "hidden_act": "silu", "vocab_size": 152064}
QWEN25_7B_VISION = {"hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "patch_size": 14,
                    "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112, "out_hidden_size": 3584,
                    "hidden_act": "silu", "tokens_per_second": 2}
QWEN25_PIECES = 151643  # learned BPE pieces; the 22 special tokens follow (151,665 tokens), then 399 spare rows
QWEN25_PIXELS = {"min_pixels": 3136, "max_pixels": 12845056}
# Qwen2.5's 22 added tokens, in their id order (151643 ...)
QWEN25_ADDED = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
                "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>")
# the same path on a tiny model (tests): sizes only
QWEN_TINY_TEXT = {**QWEN25_7B_TEXT, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
                  "num_key_value_heads": 2, "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
                  "vocab_size": 800}
QWEN_TINY_VISION = {**QWEN25_7B_VISION, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "patch_size": 14,
                    "window_size": 112, "out_hidden_size": 64}
QWEN_LAYOUTS = {"7b": (QWEN25_7B_TEXT, QWEN25_7B_VISION, QWEN25_PIECES),
                "tiny": (QWEN_TINY_TEXT, QWEN_TINY_VISION, 700)}


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


# -- Qwen2.5-VL (the transformers-native backend) ---------------------------------------------------------------

def qwen_vocabulary(pieces: int):
    """A Qwen2-layout ``Qwen2TokenizerFast`` with Qwen2.5's size and id layout: ``pieces`` byte-level BPE pieces (a BPE
    learned here on a synthetic corpus, filled up with pieces no merge makes), then Qwen2.5's 22 added tokens. The
    benchmark needs the vocabulary's size and layout (embedding rows, LM-head width, where the GETok ids start), not
    its language."""
    from tokenizers import Tokenizer
    from transformers import AddedToken, Qwen2TokenizerFast

    from llava_getok.hf.tiny import QWEN_CHAT_TEMPLATE, QWEN_SPECIAL, qwen_tokenizer

    spec = json.loads(qwen_tokenizer(vocab_size=min(pieces, 2000)).backend_tokenizer.to_str())
    spec["added_tokens"] = []
    vocab = spec["model"]["vocab"]
    k = 0
    while len(vocab) < pieces:
        vocab.setdefault(f"\u0120fill{k}", len(vocab))
        k += 1
    fast = Qwen2TokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), bos_token=None, eos_token=None,
                              pad_token=None, unk_token=None, errors="replace", clean_up_tokenization_spaces=False,
                              model_max_length=32768)
    fast.add_special_tokens({"additional_special_tokens": [AddedToken(t, special=True, normalized=False)
                                                           for t in QWEN25_ADDED]},
                            replace_additional_special_tokens=False)
    fast.eos_token, fast.pad_token = "<|im_end|>", "<|endoftext|>"  # after the added tokens: their ids stay in order
    fast.chat_template = QWEN_CHAT_TEMPLATE
    ids = fast.convert_tokens_to_ids(list(QWEN25_ADDED))
    assert len(fast) == pieces + len(QWEN25_ADDED) and ids == list(range(pieces, len(fast))), (len(fast), ids[:3])
    assert QWEN25_ADDED[:len(QWEN_SPECIAL)] == QWEN_SPECIAL  # the tiny models' special tokens are the first 14
    return fast


def build_qwen(tmp: Path, layers: int, n_records: int, layout: str = "7b") -> tuple[Path, dict]:
    """(model folder, {trainer: data file}): Qwen2.5-VL at ``layout``'s sizes cut to ``layers`` decoder layers and
    vision blocks (random weights, saved with its tokenizer and the 7B's processor), and the same COCO records as
    GETok answers and as Qwen2.5-VL's own JSON answers."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessor

    import llava_getok as gt
    from llava_getok.formats import Qwen25Format, record_format_dict
    from llava_getok.hf.family import ImageOnlyQwenProcessor, save_processor
    from llava_getok.hf.tiny import QWEN_CHAT_TEMPLATE
    from llava_getok.llava.tiny import make_grounding_data

    text, vision, pieces = QWEN_LAYOUTS[layout]
    tok = qwen_vocabulary(pieces)
    ids = dict(zip(QWEN25_ADDED, tok.convert_tokens_to_ids(list(QWEN25_ADDED))))
    config = Qwen2_5_VLConfig(
        text_config={**text, "num_hidden_layers": layers, "tie_word_embeddings": False,
                     "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
                     "pad_token_id": ids["<|endoftext|>"]},
        vision_config={**vision, "depth": layers, "fullatt_block_indexes": [layers - 1]},  # windowed, then full
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False)
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config)
    out = tmp / f"qwen2.5-vl-{layout}-cut"
    model.save_pretrained(out, safe_serialization=True)
    del model
    save_processor(ImageOnlyQwenProcessor(image_processor=Qwen2VLImageProcessor(**QWEN25_PIXELS), tokenizer=tok,
                                          chat_template=QWEN_CHAT_TEMPLATE), out)
    getok = make_grounding_data(tmp / "data-getok", COCO, gt.GETokConfig(grid=GRID), n_records=n_records, frame="orig")
    records = json.loads(getok.read_text())
    fmt = Qwen25Format(**QWEN25_PIXELS)
    for r in records:  # the same question, answered as Qwen2.5-VL answers it
        bound = fmt.for_image(r["getok"]["size"])
        (x0, y0), (x1, y1) = r["getok"]["shapes"][0]["points"]
        w, h = r["getok"]["size"]
        label = r["conversations"][0]["value"].split("Where is the ", 1)[1].split("?", 1)[0]
        r["conversations"][1]["value"] = bound.answer([[x0 / w, y0 / h, x1 / w, y1 / h]], label)
        r["getok"] = {**{k: v for k, v in r["getok"].items() if k != "config"}, **record_format_dict(fmt)}
    plain = tmp / "data-getok" / "plain.json"
    plain.write_text(json.dumps(records, indent=1))
    return out, {"plain": plain, "GETok": getok}


def qwen_parameters(model_dir: Path, added: int) -> tuple[int, int]:
    """(parameters full fine-tuning trains, frozen ones: the vision tower's blocks) of the saved model with ``added``
    more embedding and LM-head rows, from the safetensors headers."""
    from safetensors import safe_open

    trained = frozen = 0
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for key in st.keys():
                shape = st.get_slice(key).get_shape()
                n = 1
                for v in shape:
                    n *= v
                if key.endswith(("embed_tokens.weight", "lm_head.weight")):
                    n += added * shape[1]
                if "visual." in key and "merger" not in key:
                    frozen += n
                else:
                    trained += n
    return trained, frozen


def full_memory_bytes(model_dir: Path, added: int) -> int:
    """What full fine-tuning in float32 holds before any activation: weights (4 bytes), gradients (4) and AdamW's two
    moments (8) of what trains, the frozen tower's weights."""
    trained, frozen = qwen_parameters(model_dir, added)
    return 16 * trained + 4 * frozen


def qwen_worker(job: dict) -> dict:
    """One cell: ``python -m llava_getok.hf.train``'s ``build`` and ``Trainer.train`` for warm-up + ``steps`` + 1
    steps, timed and measured by a callback."""
    import resource

    import torch
    from transformers import TrainerCallback

    from llava_getok.hf.train import build

    device, steps, getok = job["device"], job["steps"], job["trainer"] == "GETok"
    data = Path(job["data"])
    argv = ["--model_name_or_path", job["model"], "--data_path", str(data), "--image_folder",
            str(data.parent / "images"), "--output_dir", job["out"], "--max_steps", str(steps + 2),
            "--per_device_train_batch_size", str(job["batch"]), "--learning_rate", "1e-5", "--save_strategy", "no", "--report_to", "none",
            "--logging_steps", "1", "--getok_grid", str(GRID), "--seed", "0", "--dataloader_num_workers", "0",
            "--disable_tqdm", "True", "--use_cpu", str(device == "cpu"), "--bf16", str(job["precision"] == "bf16"),
            "--lora_enable", str(job["mode"] == "lora"), "--lora_r", "64", "--lora_alpha", "128"]
    trainer = build(argv)

    class Clock(TrainerCallback):
        """CPU time (CUDA: wall time) of each optimiser step; the last step under PeakMemory."""

        def __init__(self):
            self.times, self.n, self.memory, self.batch = [], 0, None, None

        def _sync(self):
            if device == "cuda":
                torch.cuda.synchronize()

        def on_step_begin(self, args, state, control, **kwargs):
            self.n += 1
            if self.n == steps + 2:
                self.memory = PeakMemory(device).__enter__()
            self._sync()
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kwargs):
            self._sync()
            if self.memory is not None:
                self.memory.__exit__(None, None, None)
            elif self.n > 1:
                self.times.append(time.perf_counter() - self.t0 if device == "cuda" else time.process_time() - self.c0)

    clock = Clock()
    trainer.add_callback(clock)
    seen = {}
    collate = trainer.data_collator

    def keep_batch(items):  # the batch the steps train on (for its length and the row measurement)
        batch = collate(items)
        seen.setdefault("batch", batch)
        return batch

    trainer.data_collator = keep_batch
    trainer.train()
    model = trainer.model
    batch = seen["batch"]
    result = {"step_s": statistics.median(clock.times), "peak_bytes": clock.memory.peak,
              "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
              "seq_len": int(batch["input_ids"].shape[1]), "labelled": int((batch["labels"] != -100).sum()),
              "image_tokens": int(batch["image_grid_thw"].prod(-1).sum()) // 4,
              "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
              "vocab_rows": model.get_input_embeddings().weight.shape[0], "losses": [
                  h["loss"] for h in trainer.state.log_history if "loss" in h]}
    if getok and job["mode"] == "lora":
        result["rows_bytes"] = rows_memory(model, batch, device)
    return result


def rows_memory(peft_model, batch, device: str) -> int:
    """What the GETok rows add to one forward + backward of the embedding (the step's ids) and the LM head (as many
    positions as the step labels): the peak with peft's trainable-token layers as the model runs them
    (``llava_getok.hf.light_tokens``' forward) minus the peak with the frozen layers alone."""
    import torch

    base = peft_model.get_base_model()
    emb, head = base.get_input_embeddings(), base.get_output_embeddings()
    ids = batch["input_ids"].to(emb.weight.device)
    hidden = torch.randn(int((batch["labels"] != -100).sum()), head.weight.shape[1], device=ids.device,
                         requires_grad=True)

    def peak(e, h) -> int:
        with PeakMemory(device) as memory:
            (e(ids).float().sum() + h(hidden).float().sum()).backward()
        return memory.peak

    plain = peak(emb.original_module, head.original_module)
    return peak(emb, head) - plain


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=2, help="decoder layers (and CLIP layers) kept")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="measured steps after one warm-up step")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--precisions", default=None, help="fp32,bf16 (qwen2.5-vl: fp32)")
    p.add_argument("--modes", default="full,lora")
    p.add_argument("--family", default="llava", choices=("llava", "qwen2.5-vl"))
    p.add_argument("--layout", default="7b", choices=tuple(QWEN_LAYOUTS), help="qwen2.5-vl: the 7B's sizes or tiny")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.precisions = a.precisions or ("fp32" if a.family == "qwen2.5-vl" else "fp32,bf16")
    if a.worker:
        import torch

        torch.set_num_threads(a.threads)
        job = json.loads(a.worker)
        print("RESULT " + json.dumps(qwen_worker(job) if job.get("family") == "qwen2.5-vl" else worker(job)))
        return 0
    if a.family == "qwen2.5-vl":
        return qwen_main(a)
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


def run_worker(job: dict, threads: int) -> dict:
    """One cell in a process of its own: its result, or SystemExit naming the cell (its output's tail on stderr)."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job), "--threads", str(threads)],
                          capture_output=True, text=True, env=env)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"real_shapes: the {job['precision']} {job['mode']} {job['trainer']} run failed")
    return json.loads(line[len("RESULT "):])


def total_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def qwen_main(a, out_dir: Path = REPO / "bench" / "results") -> int:
    """``--family qwen2.5-vl``: build, run the cells (full fine-tuning where it fits), write the table."""
    import llava_getok as gt

    gib, rows, skipped = 2**30, [], []
    added = len(gt.GETokConfig(grid=GRID).tokens())
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        model, data = build_qwen(tmp, a.layers, a.batch, a.layout)
        need = full_memory_bytes(model, added)
        for precision in a.precisions.split(","):
            for mode in a.modes.split(","):
                if mode == "full" and a.device == "cpu" and need > 0.9 * total_memory():
                    skipped.append(f"{precision} full: not run: full fine-tuning holds {need / gib:.1f} GiB of "
                                   f"float32 weights, gradients and AdamW moments before any activation (the untied "
                                   f"{added}-row-grown embedding and LM head alone are most of it), more than this "
                                   f"machine's {total_memory() / gib:.1f} GiB")
                    continue
                cell = {}
                for trainer in ("plain", "GETok"):
                    job = {"family": "qwen2.5-vl", "model": str(model), "data": str(data[trainer]),
                           "device": a.device, "precision": precision, "mode": mode, "trainer": trainer,
                           "batch": a.batch, "steps": a.steps, "out": str(tmp / f"out-{precision}-{mode}-{trainer}")}
                    cell[trainer] = run_worker(job, a.threads)
                    print(f"{precision} {mode} {trainer}: {cell[trainer]}", file=sys.stderr, flush=True)
                rows.append((precision, mode, cell["plain"], cell["GETok"]))
    table = ["| precision | mode | plain s/step | GETok s/step | time ratio | plain peak GiB | GETok peak GiB "
             "| memory ratio | plain max RSS GiB | GETok max RSS GiB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for precision, mode, plain, getok in rows:
        table.append(f"| {precision} | {mode} | {plain['step_s']:.2f} | {getok['step_s']:.2f} | "
                     f"{getok['step_s'] / plain['step_s']:.3f} | {plain['peak_bytes'] / gib:.2f} | "
                     f"{getok['peak_bytes'] / gib:.2f} | {getok['peak_bytes'] / plain['peak_bytes']:.3f} | "
                     f"{plain['max_rss_bytes'] / gib:.2f} | {getok['max_rss_bytes'] / gib:.2f} |")
    import torch

    notes = [f"- {x}" for x in skipped]
    for precision, mode, plain, getok in rows:
        notes.append(f"- {precision} {mode}: sequence {plain['seq_len']} (plain) / {getok['seq_len']} (GETok) "
                     f"positions, {getok['image_tokens']} image tokens; labelled {plain['labelled']} / "
                     f"{getok['labelled']}; matrices {plain['vocab_rows']} / {getok['vocab_rows']} rows; trainable "
                     f"{plain['trainable'] / 1e6:.1f}M / {getok['trainable'] / 1e6:.1f}M parameters; losses "
                     f"{[round(x, 3) for x in plain['losses']]} / {[round(x, 3) for x in getok['losses']]}")
        if "rows_bytes" in getok:
            notes.append(f"- {precision} {mode}: the GETok rows (peft trainable tokens at both ends) add "
                         f"{getok['rows_bytes'] / gib:.2f} GiB to one forward + backward of the embedding and LM "
                         f"head on the step's positions (against the frozen layers alone)")
    text, vision, pieces = QWEN_LAYOUTS[a.layout]
    name = a.layout.upper() if a.layout == "7b" else a.layout
    info = (f"\nQwen2.5-VL-{name} layout cut to {a.layers} decoder layers ({text['hidden_size']} wide, MLP "
            f"{text['intermediate_size']}, {text['num_attention_heads']} heads / {text['num_key_value_heads']} "
            f"key-value heads, untied embedding and LM head of {text['vocab_size']} rows for "
            f"{pieces + len(QWEN25_ADDED)} tokens; GETok: + {added} tokens, grid {GRID}, 1 offset round) "
            f"and its ViT at full width ({vision['hidden_size']} wide, {vision['num_heads']} heads, patch "
            f"{vision['patch_size']}, merge {vision['spatial_merge_size']}, out {vision['out_hidden_size']}) cut to "
            f"{a.layers} blocks, random weights; batch {a.batch} of COCO referring records at the processor's pixel "
            f"range (min_pixels {QWEN25_PIXELS['min_pixels']}, max_pixels {QWEN25_PIXELS['max_pixels']}). Both "
            f"through `python -m llava_getok.hf.train`'s build and trl's SFTTrainer (`Trainer.train`), LoRA r=64 / "
            f"alpha 128 on the language model's linear layers; plain: the same questions answered in Qwen2.5-VL's "
            f"own JSON (no tokens added, trl's loss); GETok: GETok answers, box-token loss on, the GETok rows as "
            f"peft trainable tokens. One process per cell, {a.steps} steps after a warm-up (forward, backward, "
            f"clipping, AdamW), median {'CPU' if a.device == 'cpu' else 'wall'} time; peak memory: what torch "
            f"allocates during one more step above what was allocated before it (model and optimiser state), as the "
            f"LLaVA table; max RSS: the process's, loading included. {time.strftime('%Y-%m-%d')}, {a.device} "
            f"({os.cpu_count()} cores, {total_memory() / gib:.1f} GiB), {a.threads} threads, "
            f"{a.precisions} (float32 weights{', bf16 autocast' if 'bf16' in a.precisions else ''}), "
            f"torch {torch.__version__}, {platform.processor() or platform.machine()}.\n\n" + "\n".join(notes) +
            f"\n\nTargets: time ratio <= 1.05, memory ratio <= 1.0.\n"
            f"Reproduce: `python bench/real_shapes.py --family qwen2.5-vl --layout {a.layout} --layers {a.layers} "
            f"--batch {a.batch} --steps {a.steps} --device {a.device} --precisions {a.precisions} --modes {a.modes}`\n")
    body = "\n".join(table) + "\n" + info
    print(body)
    from llava_getok.atomic import write_text_atomic

    stem = ("real_shapes_qwen" + ("" if a.device == "cpu" else "_" + a.device)
            + ("" if a.layout == "7b" else "_" + a.layout))
    write_text_atomic(out_dir / f"{stem}.md", f"# GETok at Qwen2.5-VL-{name}'s shapes (transformers-native backend)\n\n"
                      + body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
