"""GRPO for a checkpoint of the transformers-native backend (``llava_getok.hf``: Qwen2.5-VL, llava-hf): trl's own
vision-language path with the model's processor, and only what GETok adds.

- The policy: the starting checkpoint loaded back (``hf.checkpoint.load_checkpoint``: an SFT LoRA checkpoint is its
  base with the adapter merged and its GETok rows written in), then new LoRA adapters on the language model with the
  GETok rows as peft's trainable tokens (``hf.prepare.lora_model``, as SFT trains them), or full fine-tuning. Float32
  weights under bf16 autocast (``--bf16``), as SFT: the rows a checkpoint saves are then the adapter's exactly.
- Prompts: the same chat messages and template as SFT and ``llava-getok predict`` (``hf.data.turn_messages``); each
  generation batch's images are read from ``image_path`` (upright, RGB: ``llava_getok.images``) and handed to trl as
  the ``image`` column, so trl's processor path makes the pixels and carries them to the log-probabilities.
- Log-probabilities: trl's, through its fused LM head, which reads ``lm_head.weight``: peft's trainable-token wrapper
  answers it with the trained GETok rows written in, and with the adapters disabled (trl's KL reference under LoRA)
  with the starting matrix, so the reference is the starting model (tests/test_rl_hf.py checks it after the rows
  moved).
- Rollouts: the model's own ``generate`` on trl's processor inputs, left-padded, with the GETok grammar as a logits
  processor when asked (``--constrained``); the refine stage's first answers the same way, greedy.
- Checkpoints: ``hf.saving`` (as SFT's): the adapter (kind ``lora``, whose base is the starting checkpoint, loaded
  back through it) or the whole model (``full``), the processor, the rows and the sidecar, at every save.
"""
from __future__ import annotations

import json
from dataclasses import asdict, replace

import numpy as np
import torch
from transformers import LogitsProcessorList, Trainer
from trl.data_utils import prepare_multimodal_messages
from trl.trainer.utils import pad

from ..hf.data import turn_messages
from ..hf.generate import prompt_text
from ..hf.saving import GETokSaving
from ..training.sidecar import Sidecar
from .getok_grpo import GETokGRPOTrainer


def prompt_renderer(processor):
    """``turns -> prompt text``: what SFT rendered before the answer (the model's chat template)."""
    return lambda turns: prompt_text(processor, turns)


def load_policy(args, sidecar: Sidecar, device: str):
    """(processor, model ready for training, None, sidecar, GETok ids) of the starting checkpoint ``args.model_path``
    (see the module docstring): float32 weights, which ``--bf16`` trains and generates under autocast."""
    import os

    from ..hf.checkpoint import load_checkpoint
    from ..hf.family import family_named
    from ..hf.prepare import GETokState, LoraSettings, lora_model

    if args.bits != 16:
        raise ValueError(f"--bits {args.bits}: GRPO of an hf-backend checkpoint trains 16-bit weights (LoRA or full)")
    # float32 weights and bf16 autocast (as SFT trains): peft writes the trained GETok rows into the matrix in its dtype,
    # and in bf16 the rows a checkpoint saves would be rounded copies of the adapter's, which it would not load back
    processor, model, sidecar = load_checkpoint(args.model_path, args.model_base, device, torch.float32)
    family = family_named(sidecar.model_family)
    ids = list(sidecar.token_ids)
    if args.lora:
        state = GETokState(sidecar.config, ids, None, 0, sidecar.vocab_size)
        zero3 = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3"
        model = lora_model(model, family, state, LoraSettings(args.lora_r, args.lora_alpha, args.lora_dropout),
                           quantized=False, zero3=zero3, gradient_checkpointing=args.gradient_checkpointing)
    else:  # as SFT's full fine-tuning: everything but the vision tower (its projector trains)
        model.requires_grad_(True)
        model.get_submodule(family.vision).requires_grad_(False)
        model.get_submodule(family.projector).requires_grad_(True)
    model.train()
    return processor, model, None, sidecar, ids


def make_trainer(args, policy, reward_funcs, grpo, rows, logits_processor, first_answers, callbacks):
    """The :class:`HfGRPOTrainer` of ``policy`` (from :func:`load_policy`) on the prompt ``rows``."""
    from datasets import Dataset

    from ..hf.family import family_named
    from ..hf.prepare import GETokState

    processor, model, _, sidecar, ids = policy
    if grpo.gradient_checkpointing and not grpo.gradient_checkpointing_kwargs:
        grpo.gradient_checkpointing_kwargs = {"use_reentrant": False}  # as SFT: the reentrant one fails under DDP
    return HfGRPOTrainer(model, processor, reward_funcs, grpo, Dataset.from_list(rows),
                         getok=GETokState(sidecar.config, ids, None, 0, sidecar.vocab_size),
                         start=sidecar, start_path=args.model_path,
                         settings={"grpo": asdict(args), "start": sidecar.settings},
                         logits_processor=logits_processor, callbacks=list(callbacks), first_answers=first_answers)


class HfGRPOTrainer(GETokSaving, GETokGRPOTrainer):
    """GRPO for a model of ``llava_getok.hf``. Dataset rows (``rl/data.py``): ``prompt`` (the rendered text: what
    groups a generation batch), ``conversation`` (the turns, JSON), ``image_path``, and the rewards' columns.

    getok: the GETok ids (``hf.prepare.GETokState``); start / start_path: the starting checkpoint's sidecar and folder
    (a LoRA checkpoint of this run names it as its base); settings: what the sidecar records of this run."""

    def __init__(self, model, processor, reward_funcs, args, train_dataset, getok, start: Sidecar, start_path: str,
                 settings: dict, logits_processor=None, callbacks=None, first_answers=None):
        self.getok, self.start, self.start_path, self.run_settings = getok, start, str(start_path), settings
        super().__init__(model, processor, reward_funcs, args, train_dataset, logits_processor=logits_processor,
                         callbacks=callbacks, first_answers=first_answers)

    def sidecar(self) -> Sidecar:
        lora = self.checkpoint_kind() == "lora"
        return replace(self.start, kind=self.checkpoint_kind(), base_model=self.start_path if lora else None,
                       settings=self.run_settings)

    # -- prompts and images ----------------------------------------------------------------------------------
    def _generate_and_score_completions(self, inputs):
        from ..images import load_image

        images = {}
        for x in inputs:  # a group's G rows share one image: read once
            if x["image_path"] not in images:
                images[x["image_path"]] = load_image(x["image_path"])
        rows = [{**x, "image": images[x["image_path"]]} for x in inputs]
        if self.first_answers is not None:
            rows = self.first_answers(self, rows)
        # trl's vision-language path: chat messages with an image part, the image in the "image" column
        rows = [{**x, "prompt": turn_messages(json.loads(x["conversation"]))} for x in rows]
        return super()._generate_and_score_completions(rows)

    def with_turns(self, row: dict, turns: list[dict]) -> dict:
        return {**row, "prompt": prompt_text(self.processing_class, turns), "conversation": json.dumps(turns)}

    def first_answer_ids(self, rows, ks, conversations, generation_config, processors) -> list[list[int]]:
        messages = [prepare_multimodal_messages(turn_messages(c), images=[rows[k]["image"]])
                    for k, c in zip(ks, conversations)]
        prompt_ids, _, fields = self._tokenize_prompts(messages)
        return self._generate_ids(prompt_ids, fields, generation_config, processors)

    # -- rollouts --------------------------------------------------------------------------------------------
    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        if self.use_vllm or self.use_transformers_continuous_batching:
            raise NotImplementedError("llava-getok's GRPO generates with the model's own generate (no vLLM)")
        return self._generate_ids(prompt_ids, multimodal_fields, self.generation_config,
                                  self.rollout_logits_processor), None

    def _generate_ids(self, prompt_ids, fields, generation_config, processors=None) -> list[list[int]]:
        """The model's ``generate`` on left-padded prompts with their processor fields (trl's regular rollout, plus
        logits processors); each row's new ids up to and including its first end of turn."""
        tensors = [torch.tensor(ids) for ids in prompt_ids]
        inputs = {"input_ids": pad(tensors, padding_value=self._tokenizer.pad_token_id, padding_side="left"),
                  "attention_mask": pad([torch.ones_like(t) for t in tensors], padding_value=0, padding_side="left")}
        for key, value in fields.items():
            if isinstance(value, torch.Tensor):
                inputs[key] = value
            elif isinstance(value, list) and value and isinstance(value[0], list):  # per token: left-padded too
                inputs[key] = pad([torch.tensor(v) for v in value], padding_value=0, padding_side="left")
            else:
                inputs[key] = torch.tensor(np.array(value))
        inputs = Trainer._prepare_inputs(self, inputs)
        with (
            self.unwrapped_for_generation() as unwrapped,
            torch.no_grad(),
            self.accelerator.autocast(),  # float32 weights: bf16 rollouts with --bf16, as the log-probabilities
        ):
            out = unwrapped.generate(**inputs, generation_config=generation_config,
                                     logits_processor=LogitsProcessorList(processors or []))
        eos = torch.tensor(self.eos_token_ids)
        result = []
        for row in out[:, inputs["input_ids"].shape[1]:].cpu():  # the prompt comes back first
            hits = torch.isin(row, eos).nonzero()
            result.append(row[: int(hits[0]) + 1 if len(hits) else len(row)].tolist())
        return result
