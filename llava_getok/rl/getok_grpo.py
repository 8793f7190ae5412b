"""What the GRPO trainers of both backends (``rl/trainer.py`` for LLaVA, ``rl/hf_trainer.py`` for Qwen2.5-VL and
llava-hf) share around trl's ``GRPOTrainer``: the KL reference that is the starting model, grammar-constrained
rollouts and the refine stage's first answers (``rl/first_answers.py``).

The reference: under LoRA trl scores it inside ``peft_model.disable_adapter()`` (no second model; trl's copy of the
adapter, "ref", is dropped: ours start as the starting model); a backend whose
trainable GETok rows are not switched off with the adapters turns them off there too
(:meth:`GETokGRPOTrainer._reference_is_the_starting_model`). Full fine-tuning with a KL term gets a copy of the policy
made before training: trl would reload the reference from the config's path and lose in-memory GETok rows.
"""
from __future__ import annotations

import copy

from trl import GRPOConfig, GRPOTrainer
from trl.models.utils import unwrap_model_for_generation


class GETokGRPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` + the starting model as the KL reference, rollout ``logits_processor`` (a list of
    transformers logits processors: the grammar) and ``first_answers`` (``f(trainer, rows) -> rows`` run on each
    generation batch before the rollouts: :class:`~llava_getok.rl.first_answers.PolicyFirstAnswers`).

    A backend overrides the rollout itself and provides ``first_answer_ids`` / ``with_turns`` for the refine stage."""

    def __init__(self, model, processing_class, reward_funcs, args: GRPOConfig, train_dataset, peft_config=None,
                 logits_processor=None, callbacks=None, first_answers=None):
        self.rollout_logits_processor = logits_processor
        self.first_answers = first_answers
        beta = args.beta
        own_ref = beta != 0.0 and peft_config is None and not hasattr(model, "peft_config")
        ref = copy.deepcopy(model).eval().requires_grad_(False) if own_ref else None
        if own_ref:
            args.beta = 0.0  # trl builds no reference of its own then
        super().__init__(model=model, reward_funcs=reward_funcs, args=args, train_dataset=train_dataset,
                         processing_class=processing_class, peft_config=peft_config, callbacks=callbacks)
        if own_ref:
            from trl.trainer.utils import add_fused_lm_head

            args.beta = self.beta = beta
            # as trl prepares a reference of its own: its log-probabilities come from the fused LM head
            add_fused_lm_head(ref, temperature=self.temperature, cast_lm_head_to_fp32=args.cast_lm_head_to_fp32)
            self.ref_model = self.accelerator.prepare_model(ref, evaluation_mode=True)
        if self.ref_model is None and beta != 0.0:
            peft_model = self.accelerator.unwrap_model(self.model)
            if "ref" in getattr(peft_model, "peft_config", {}):
                # trl, given a PEFT model, copies its adapter as "ref" and scores the reference with it: the copy is
                # the LoRA of the start (a no-op) but leaves GETok rows trained outside peft on, and every checkpoint
                # would carry it. Our adapters start at the starting model: disabling them is the reference.
                peft_model.delete_adapter("ref")
            self._reference_is_the_starting_model(peft_model)

    def _reference_is_the_starting_model(self, peft_model) -> None:
        """Make ``peft_model.disable_adapter()`` turn off whatever else trains (nothing by default)."""

    # -- the refine stage's first answers (rl/first_answers.py) ------------------------------------------------
    def unwrapped_for_generation(self):
        """The policy as ``generate`` wants it (ZeRO-3 parameters gathered, gradient checkpointing off), as trl's own
        rollouts unwrap it: a context manager."""
        return unwrap_model_for_generation(
            self.model_wrapped, self.accelerator, gather_deepspeed3_params=self.args.ds3_gather_for_generation,
            generation_kwargs=self.generation_kwargs,
            gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs)

    def first_answer_ids(self, rows, ks, conversations, generation_config, processors) -> list[list[int]]:
        raise NotImplementedError

    def with_turns(self, row: dict, turns: list[dict]) -> dict:
        raise NotImplementedError
