"""GRPO on a GETok checkpoint: arguments (the CLI is built from :class:`RLArgs`), model set-up, run. The backend is
the starting checkpoint's (its sidecar says): LLaVA (``rl/trainer.py``) or transformers-native Qwen2.5-VL / llava-hf
(``rl/hf_trainer.py``); the data, rewards, grammar and stages are the same for both.

Stage ``grid`` trains on rec / det / res / point records with the format, repetition and grounding rewards;
stage ``refine`` trains the second turn of refine records (offsets to the first answer) with the format,
repetition and refine rewards. The paper runs grid first and refine from the grid-stage checkpoint
(scripts/grpo_getok.sh).
"""
from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from .rewards import STAGE_REWARDS, RewardConfig, get_reward


@dataclass
class RLArgs:
    model_path: str = field(metadata={"help": "GETok checkpoint to start from (the SFT model, or a grid-stage one)"})
    data: str = field(metadata={"help": "converted JSON / JSONL (docs/data-format.md), ground truth in 'getok'"})
    image_folder: str = field(metadata={"help": "folder the records' 'image' paths are relative to"})
    output_dir: str = field(metadata={"help": "where checkpoints and logs go"})
    model_base: str | None = field(default=None, metadata={"help": "base model of a LoRA checkpoint"})
    stage: str = field(default="grid", metadata={"help": "grid (rec/det/res/point) or refine (second-turn offsets)"})
    conv_mode: str = field(default="llava_v1", metadata={"help": "LLaVA conversation template (as in SFT); an hf-"
                                                                  "backend model uses its own chat template"})
    rewards: str | None = field(default=None, metadata={"help": "comma-separated reward names; default by stage: "
                                                                 + "; ".join(f"{k}: {','.join(v)}" for k, v in STAGE_REWARDS.items())})
    reward_weights: str | None = field(default=None, metadata={"help": "per-reward weights in the total, comma-"
                                                                        "separated, same order as --rewards (default 1 each)"})
    reward_config: str | None = field(default=None, metadata={"help": "JSON overriding RewardConfig fields, e.g. "
                                                                       "'{\"box_l1\": 0.5, \"think\": true}'"})
    num_generations: int = field(default=8, metadata={"help": "group size G: completions sampled per prompt"})
    batch_size: int | None = field(default=None, metadata={"help": "completions per device per step (default G; "
                                                                    "a multiple of G)"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro-batches per optimiser step"})
    max_steps: int = field(default=500, metadata={"help": "optimiser steps"})
    learning_rate: float = field(default=1e-5, metadata={"help": "AdamW learning rate"})
    beta: float = field(default=0.04, metadata={"help": "KL coefficient against the starting model (0: no reference)"})
    max_new_tokens: int = field(default=64, metadata={"help": "completion budget per rollout"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature of the rollouts"})
    loss_type: str = field(default="dapo", metadata={"help": "trl loss aggregation: dapo / dr_grpo (length-"
                                                              "unbiased, default dapo) or grpo (per-sequence mean: "
                                                              "biased towards short correct answers)"})
    lora: bool = field(default=True, metadata={"help": "train LoRA adapters + the GETok rows (else full fine-tuning)"})
    lora_r: int = field(default=64, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=128, metadata={"help": "LoRA alpha"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
    bits: int = field(default=16, metadata={"help": "16, 8 or 4 (QLoRA: 4-bit base, needs --lora)"})
    constrained: bool = field(default=False, metadata={"help": "sample rollouts under the GETok grammar "
                                                               "(llava_getok.generation)"})
    constrain_only: str | None = field(default=None, metadata={"help": "with --constrained: restrict each answer "
                                                                       "to one kind (box, mask, point, shape, refinement)"})
    save_steps: int = field(default=100, metadata={"help": "checkpoint every N steps (each one loadable)"})
    logging_steps: int = field(default=1, metadata={"help": "log every N steps"})
    seed: int = field(default=42, metadata={"help": "random seed"})
    bf16: bool | None = field(default=None, metadata={"help": "bfloat16 autocast (default: on when CUDA has it)"})
    gradient_checkpointing: bool = field(default=True, metadata={"help": "trade compute for memory"})
    device: str | None = field(default=None, metadata={"help": "cuda or cpu (default: cuda when available; under a "
                                                                "multi-process launcher each rank its local GPU)"})
    first_answer: str = field(default="data", metadata={"help": "refine stage: refine the first answer stored "
                                                                  "in the data, or 'policy': the model's own greedy "
                                                                  "first answer, re-asked each batch (as at inference)"})
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "a checkpoint-N folder of this "
                                                                               "run to continue from"})

    def __post_init__(self):
        if self.stage not in STAGE_REWARDS:
            raise ValueError(f"--stage must be one of {sorted(STAGE_REWARDS)}, got {self.stage!r}")
        if self.bits not in (4, 8, 16):
            raise ValueError(f"--bits must be 4, 8 or 16, got {self.bits}")
        if self.bits != 16 and not self.lora:
            raise ValueError("--bits 4/8 quantises the base: it needs --lora (QLoRA)")
        if self.first_answer not in ("data", "policy"):
            raise ValueError(f"--first-answer must be data or policy, got {self.first_answer!r}")
        if self.num_generations < 2:
            raise ValueError("--num-generations must be >= 2: GRPO's advantage is relative within a group")
        if self.batch_size is not None and self.batch_size % self.num_generations:
            raise ValueError(f"--batch-size {self.batch_size} must be a multiple of --num-generations "
                             f"{self.num_generations}")


def reward_funcs(args: RLArgs, id_to_token):
    names = args.rewards.split(",") if args.rewards else list(STAGE_REWARDS[args.stage])
    overrides = json.loads(args.reward_config) if args.reward_config else {}
    unknown = set(overrides) - {f.name for f in fields(RewardConfig)}
    if unknown:
        raise ValueError(f"--reward-config: unknown field(s) {sorted(unknown)}; "
                         f"valid: {sorted(f.name for f in fields(RewardConfig))}")
    config = RewardConfig(**overrides)
    funcs = [get_reward(n.strip(), config, id_to_token) for n in names]
    weights = None
    if args.reward_weights:
        weights = [float(w) for w in args.reward_weights.split(",")]
        if len(weights) != len(funcs):
            raise ValueError(f"--reward-weights has {len(weights)} values for {len(funcs)} rewards {names}")
    return funcs, weights


def lora_target_modules(model) -> list[str]:
    """Names of the language model's linear layers (what LLaVA's find_all_linear_names picks): not the
    vision tower, the projector or the LM head."""
    import torch

    skip = ("mm_projector", "vision_tower", "vision_resampler", "lm_head")
    names = set()
    for name, module in model.named_modules():
        if any(s in name for s in skip):
            continue
        if isinstance(module, torch.nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt"):
            names.add(name.split(".")[-1])
    return sorted(names)


def start_sidecar(model_path: str):
    """The starting checkpoint's sidecar; ValueError without one."""
    from ..training.sidecar import read_sidecar

    sidecar = read_sidecar(model_path)
    if sidecar is None:
        raise ValueError(f"{model_path}: no getok_config.json; GRPO starts from a GETok checkpoint (SFT first)")
    return sidecar


def load_policy(args: RLArgs):
    """(tokenizer, model, image_processor, sidecar, getok ids) ready for training: the GETok checkpoint through
    the builder hook, LoRA/QLoRA adapters on the language model, the GETok rows trainable. An hf-backend checkpoint:
    (processor, model, None, sidecar, ids) from :func:`llava_getok.rl.hf_trainer.load_policy`."""
    import torch

    sidecar = start_sidecar(args.model_path)
    device = process_device(args.device)
    if sidecar.backend == "hf":  # never imports LLaVA
        from .hf_trainer import load_policy as load_hf_policy

        return load_hf_policy(args, sidecar, device)
    dtype = torch.bfloat16 if _bf16(args, device) else torch.float32
    from ..llava import register
    from ..llava.builder import load_getok_checkpoint
    from ..training.rows import attach_trainable_rows

    register()
    tokenizer, model, image_processor, _ = load_getok_checkpoint(
        args.model_path, args.model_base, load_4bit=args.bits == 4, load_8bit=args.bits == 8, device=device,
        torch_dtype=dtype)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token
    ids = list(sidecar.token_ids)
    model.get_vision_tower().requires_grad_(False)  # LLaVA never trains the tower here, and its forward is no_grad
    if args.lora:
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if args.bits in (4, 8):
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.gradient_checkpointing)
        config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, bias="none",
                            task_type="CAUSAL_LM", target_modules=lora_target_modules(model))
        model = get_peft_model(model, config)
        attach_trainable_rows(model.get_base_model(), ids)  # after LoRA: peft would freeze it otherwise
    return tokenizer, model, image_processor, sidecar, ids


def process_device(device: str | None) -> str:
    """This process's device: under a multi-process launcher (accelerate launch, torchrun) each rank takes the
    GPU of its local rank, not cuda:0; CPU ranks get what a CPU needs (llava_getok.training.cpu_ranks)."""
    import os

    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    rank = os.environ.get("LOCAL_RANK")
    if rank is None:
        return device
    if device == "cuda":
        return f"cuda:{int(rank)}"
    if device == "cpu":
        from ..training.cpu_ranks import enable

        enable()
    return device


def _bf16(args: RLArgs, device: str) -> bool:
    import torch

    if args.bf16 is not None:
        return args.bf16
    return device.startswith("cuda") and torch.cuda.is_bf16_supported()


def build_trainer(args: RLArgs, policy=None, callbacks=()):
    """The GRPO trainer for ``args``: :class:`~llava_getok.rl.trainer.LlavaGRPOTrainer` or, for an hf-backend
    checkpoint, :class:`~llava_getok.rl.hf_trainer.HfGRPOTrainer`; ``policy`` (from :func:`load_policy`) may be
    given."""
    import torch
    from trl import GRPOConfig

    from ..generation import GETokLogitsProcessor, space_token_ids
    from ..records import read_records
    from .data import build_rows
    from .first_answers import PolicyFirstAnswers

    sidecar = start_sidecar(args.model_path)
    hf = sidecar.backend == "hf"
    if hf:  # the model's chat template renders the prompts, as in SFT
        from ..hf.family import family_named, load_processor
        from .hf_trainer import prompt_renderer

        render = prompt_renderer(load_processor(args.model_path, family_named(sidecar.model_family)))
    else:
        from ..llava import register

        register()  # LLaVA's templates and fixes, before the data is rendered
        render = None
    cfg = sidecar.config
    # the data first: a bad record fails in seconds, not after loading a 7B model
    rows, skipped = build_rows(read_records(args.data, require_id=False, one_question=True), args.stage,
                               args.image_folder, args.conv_mode, args.data, frame=sidecar.frame, config=cfg,
                               render=render)
    for reason, n in sorted(skipped.items()):
        print(f"[grpo] skipped {n} record(s): {reason}", file=sys.stderr)
    from transformers import set_seed

    set_seed(args.seed)  # before the policy's LoRA adapters are made: --seed reproduces a run from its first step
    policy = policy or load_policy(args)
    tokenizer, model, image_processor, sidecar, ids = policy
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # an hf processor's
    id_to_token = dict(zip(ids, sidecar.tokens))
    funcs, weights = reward_funcs(args, id_to_token)
    device = str(next(model.parameters()).device)
    grpo = GRPOConfig(
        output_dir=args.output_dir, per_device_train_batch_size=args.batch_size or args.num_generations,
        num_generations=args.num_generations, gradient_accumulation_steps=args.gradient_accumulation_steps,
        max_steps=args.max_steps, learning_rate=args.learning_rate, beta=args.beta,
        max_completion_length=args.max_new_tokens, temperature=args.temperature, loss_type=args.loss_type,
        reward_weights=weights, bf16=_bf16(args, device), use_cpu=not device.startswith("cuda"),
        gradient_checkpointing=args.gradient_checkpointing, save_steps=args.save_steps,
        logging_steps=args.logging_steps, seed=args.seed, report_to="none", remove_unused_columns=False,
    )
    processors = None
    token_ids = dict(zip(sidecar.tokens, ids))
    if args.constrained:
        gen_cfg = cfg
        if args.stage == "grid" and cfg.mode == "refine":  # the first answer of refine data is grid-only
            gen_cfg = cfg.with_mode("grid")
        elif args.stage == "refine" and cfg.mode != "refine":  # a model of the same tokens, trained inline
            gen_cfg = cfg.with_mode("refine")
        processors = [GETokLogitsProcessor(token_ids, gen_cfg, tokenizer.eos_token_id, len(tokenizer),
                                           never_ids=[i for i in (tokenizer.bos_token_id,) if i is not None],
                                           only=args.constrain_only, max_new_tokens=args.max_new_tokens,
                                           space_ids=space_token_ids(tokenizer))]
    first_answers = None
    if args.stage == "refine" and args.first_answer == "policy":
        first_answers = PolicyFirstAnswers(cfg, token_ids, args.max_new_tokens)
    torch.manual_seed(args.seed)
    if hf:
        from .hf_trainer import make_trainer

        return make_trainer(args, policy, funcs, grpo, rows, processors, first_answers, callbacks)
    from datasets import Dataset

    from .checkpoint import GETokCheckpointCallback
    from .trainer import LlavaGRPOTrainer

    # what this run's checkpoints record: the template it answered in, its own settings and the ones it started from
    ours = replace(sidecar, template=args.conv_mode, settings={"grpo": asdict(args), "start": sidecar.settings})
    callback = GETokCheckpointCallback(tokenizer, ours, args.model_path, quantized=args.bits != 16)
    return LlavaGRPOTrainer(model, tokenizer, image_processor, funcs, grpo, Dataset.from_list(rows),
                            logits_processor=processors, callbacks=[callback, *callbacks],
                            first_answers=first_answers, conv_mode=args.conv_mode)


def run(args: RLArgs, policy=None):
    """Train, save the final checkpoint to ``output_dir`` (loadable by ``llava-getok predict``), return the
    trainer."""
    trainer = build_trainer(args, policy)
    if hasattr(trainer, "save_final"):  # llava_getok.hf: the adapter restores its GETok rows (trainable tokens)
        trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
        trainer.save_final()
        return trainer
    from .checkpoint import save_getok_checkpoint

    if args.resume_from_checkpoint:
        # trl's Trainer restores the adapter, optimiser and schedule; the GETok rows live in their own file
        from ..training.rows import set_rows
        from ..training.sidecar import read_rows, read_sidecar
        from ..llava.prepare import unwrap_llava

        folder = args.resume_from_checkpoint
        sidecar = read_sidecar(folder)
        if sidecar is None:
            raise ValueError(f"{folder}: no getok_config.json; not a checkpoint of a GETok GRPO run")
        set_rows(unwrap_llava(trainer.accelerator.unwrap_model(trainer.model)), read_rows(folder, sidecar))
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    cb = next(c for c in trainer.callback_handler.callbacks if type(c).__name__ == "GETokCheckpointCallback")
    if trainer.accelerator.is_main_process:  # one writer: the ranks hold the same model
        save_getok_checkpoint(trainer.accelerator.unwrap_model(trainer.model), cb.tokenizer, Path(args.output_dir),
                              cb.sidecar, cb.base_model, cb.quantized, final=True)
    trainer.accelerator.wait_for_everyone()
    return trainer
