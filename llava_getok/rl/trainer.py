"""trl's GRPOTrainer, taught LLaVA's image path (rollouts and log-probabilities).

trl 1.16 knows vision-language models through a ``ProcessorMixin`` (chat template + image processor that
expand image placeholders in the text). LLaVA has neither: its model takes ``images=`` and splices the image
features in at its single ``IMAGE_TOKEN_INDEX`` itself. So the trainer is given the tokenizer (trl's text
path) and four seams are overridden, everything else (sampling, group advantages, zero-variance logging,
clipped loss, KL, length-unbiased ``loss_type``, PEFT reference by disabled adapters, checkpoints) is trl's:

- ``_tokenize_prompts``: LLaVA's ``tokenizer_image_token`` (one image id, no expansion here);
- ``_generate_and_score_completions``: loads the batch's images the SFT way (``process_images``:
  expand2square for ``pad``) before trl generates and scores, and returns them as ``pixel_values`` so they
  travel with their rows through trl's shuffling and splitting;
- ``_generate_single_turn``: LLaVA's ``generate(inputs, images=...)`` with left padding (LLaVA re-pads the
  spliced sequence by ``config.tokenizer_padding_side``), optionally grammar-constrained; on transformers
  >= 4.38 it returns only the new tokens (trl's slicing by prompt length would cut them);
- ``_get_per_token_logps_and_entropies``: LLaVA's ``prepare_inputs_labels_for_multimodal`` (the same splice
  as in training) builds the embeddings, the model's ordinary forward scores them (through the LM-head hooks
  of the trainable GETok rows, which trl's fused head would bypass), and the completion tokens'
  log-probabilities are put back in completion order.

The reference (``rl/getok_grpo.py``, shared with the transformers-native backend): full fine-tuning with a KL term
gets a copy of the policy (trl would reload it from the config's path and lose in-memory GETok rows); under LoRA the
reference is the model with its adapters and, here, its GETok-row deltas disabled: the starting model.
"""
from __future__ import annotations

import contextlib
import json

import torch
from trl import GRPOConfig
from trl.trainer.utils import entropy_from_logits, pad, selective_log_softmax

from ..llava import inputs as model_inputs
from ..llava.prepare import unwrap_llava
from ..training.rows import ROWS_ATTR
from .getok_grpo import GETokGRPOTrainer


def _reference_without_getok_rows(peft_model) -> None:
    """Make the PEFT reference (trl scores it inside ``peft_model.disable_adapter()``) the starting model: with
    the adapters off, the trained GETok-row deltas would still be on, and the KL term would never hold the GETok
    rows to where they started. Wraps this instance's ``disable_adapter`` to turn the deltas off as well."""
    rows = getattr(unwrap_llava(peft_model), ROWS_ATTR, None)
    if rows is None or getattr(peft_model.disable_adapter, "__getok_rows__", False):
        return
    adapters_off = peft_model.disable_adapter

    @contextlib.contextmanager
    def disable_adapter():
        with adapters_off(), rows.disabled():
            yield

    disable_adapter.__getok_rows__ = True
    peft_model.disable_adapter = disable_adapter


class LlavaGRPOTrainer(GETokGRPOTrainer):
    """GRPOTrainer for LLaVA models. Dataset rows: ``prompt`` (rendered text with ``<image>``), ``image_path``,
    plus any columns the rewards read (``getok``, ``first_answer``).

    image_processor: the vision tower's processor (LLaVA's builder returns it).
    logits_processor: optional list of transformers logits processors for rollouts (grammar constraint).
    first_answers: optional ``f(trainer, rows) -> rows`` run on each generation batch before the rollouts
        (:class:`PolicyFirstAnswers`: the refine stage refines the policy's own first answers).
    conv_mode: LLaVA's template, which re-renders the refine stage's prompts around the policy's first answers.
    """

    def __init__(self, model, tokenizer, image_processor, reward_funcs, args: GRPOConfig, train_dataset,
                 peft_config=None, logits_processor=None, callbacks=None, first_answers=None,
                 conv_mode: str = "llava_v1"):
        self.image_processor, self.conv_mode = image_processor, conv_mode
        self._rollout_images = None  # the current generation batch's pixels, while trl generates and scores
        super().__init__(model, tokenizer, reward_funcs, args, train_dataset, peft_config=peft_config,
                         logits_processor=logits_processor, callbacks=callbacks, first_answers=first_answers)

    def _reference_is_the_starting_model(self, peft_model) -> None:
        _reference_without_getok_rows(peft_model)

    def first_answer_ids(self, rows, ks, conversations, generation_config, processors) -> list[list[int]]:
        prompts = [model_inputs.prompt_ids(model_inputs.render_prompt(t, self.conv_mode), self.processing_class)
                   for t in conversations]
        return self._llava_generate(prompts, self._rollout_images[ks], generation_config, processors)

    def with_turns(self, row: dict, turns: list[dict]) -> dict:
        return {**row, "prompt": model_inputs.render_prompt(turns, self.conv_mode), "conversation": json.dumps(turns)}

    # -- prompts and images ----------------------------------------------------------------------------------
    def _tokenize_prompts(self, prompts: list):
        if not isinstance(prompts[0], str):
            raise TypeError("LlavaGRPOTrainer expects rendered text prompts (llava_getok.rl.data.build_rows)")
        ids = [model_inputs.prompt_ids(p, self.processing_class) for p in prompts]
        image = model_inputs.image_token_index()
        bad = [p for p, x in zip(prompts, ids) if x.count(image) != 1]
        if bad:  # one image per row: LLaVA splices one feature block per <image>, and rows carry one image
            raise ValueError(f"a GRPO prompt must hold exactly one <image>; this one has "
                             f"{bad[0].count('<image>')}: {bad[0][:200]!r}")
        return ids, None, {}

    def _images_for(self, inputs) -> torch.Tensor:
        """Pixel tensors of a batch's rows, each image processed once (a group's G rows share it)."""
        model = unwrap_llava(self.accelerator.unwrap_model(self.model))
        done: dict[str, torch.Tensor] = {}
        for x in inputs:
            if x["image_path"] not in done:
                done[x["image_path"]] = model_inputs.image_tensor(x["image_path"], self.image_processor, model.config)
        out = torch.stack([done[x["image_path"]] for x in inputs])
        return out.to(device=self.accelerator.device, dtype=model.dtype)

    def _generate_and_score_completions(self, inputs):
        self._rollout_images = self._images_for(inputs)
        if self.first_answers is not None:
            inputs = self.first_answers(self, inputs)
        try:
            output = super()._generate_and_score_completions(inputs)
        finally:
            images, self._rollout_images = self._rollout_images, None
        output["pixel_values"] = images
        return output

    # -- rollouts --------------------------------------------------------------------------------------------
    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        if self.use_vllm or self.use_transformers_continuous_batching:
            raise NotImplementedError("LlavaGRPOTrainer generates with LLaVA's own generate (no vLLM)")
        return self._llava_generate(prompt_ids, self._rollout_images, self.generation_config,
                                    self.rollout_logits_processor), None

    def _llava_generate(self, prompt_ids, images, generation_config, logits_processor=None) -> list[list[int]]:
        """LLaVA's generate on left-padded prompts with their images; each row's ids up to its first EOS."""
        device = self.accelerator.device
        tensors = [torch.tensor(ids) for ids in prompt_ids]
        input_ids = pad(tensors, padding_value=self._tokenizer.pad_token_id, padding_side="left").to(device)
        attention_mask = pad([torch.ones_like(t) for t in tensors], padding_value=0, padding_side="left").to(device)
        kwargs = {}
        if logits_processor:
            from transformers import LogitsProcessorList

            kwargs["logits_processor"] = LogitsProcessorList(logits_processor)
        with (
            self.unwrapped_for_generation() as unwrapped,
            torch.no_grad(),
            model_inputs.padding_side(unwrap_llava(unwrapped), "left"),
        ):
            out = unwrapped.generate(inputs=input_ids, images=images, attention_mask=attention_mask,
                                     generation_config=generation_config, **kwargs)
        # LLaVA generates from inputs_embeds: transformers >= 4.38 returns only the new tokens
        eos = torch.tensor(self.eos_token_ids)
        result = []
        for row in out.cpu():
            hits = torch.isin(row, eos).nonzero()
            end = int(hits[0]) + 1 if len(hits) else len(row)
            result.append(row[:end].tolist())
        return result

    # -- log-probabilities ----------------------------------------------------------------------------------
    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, pixel_values=None,
                                           **unused):
        """Log-probs (and entropies) of the completion tokens, shape (B, logits_to_keep), under the image.

        LLaVA splices the image features in (``prepare_inputs_labels_for_multimodal``, left-padded so that
        every row's completion ends at the last position), then the model's ordinary forward runs on the
        embeddings. Not trl's fused LM head: it reads ``lm_head.weight`` directly and would bypass the hooks
        that add the trainable GETok rows (llava_getok.training.rows) to the head.
        """
        images = pixel_values if pixel_values is not None else self._rollout_images
        if images is None or len(images) != len(input_ids):
            raise RuntimeError("LlavaGRPOTrainer: no images for this batch (pixel_values lost between steps?)")
        llava = unwrap_llava(self.accelerator.unwrap_model(model))
        batch_size = batch_size or input_ids.size(0)
        logps, entropies = [], []
        for start in range(0, input_ids.size(0), batch_size):
            ids = input_ids[start : start + batch_size]
            mask = attention_mask[start : start + batch_size]
            n_completion = mask[:, -logits_to_keep:].sum(1)
            with model_inputs.padding_side(llava, "left"):
                _, _, mask2, _, embeds, _ = llava.prepare_inputs_labels_for_multimodal(
                    ids, None, mask, None, None, images[start : start + batch_size])
            n_image = (ids == model_inputs.image_token_index()).sum(1)
            expected = mask.sum(1) + n_image * (llava.get_vision_tower().num_patches - 1)
            if not torch.equal(mask2.sum(1), expected):
                raise RuntimeError(
                    "tokens were cut while splicing the image in: prompt + image features + completion exceed "
                    f"config.tokenizer_model_max_length ({getattr(llava.config, 'tokenizer_model_max_length', None)})")
            position_ids = (mask2.long().cumsum(-1) - 1).clamp(min=0)
            with self.accelerator.autocast():
                logits = model(inputs_embeds=embeds, attention_mask=mask2, position_ids=position_ids,
                               use_cache=False).logits
            # Left-padded, a row ends with its n completion tokens: token k sits at L - n + k and is predicted
            # at L - n + k - 1, i.e. at column (K - n) + k of the last K + 1 positions' first K (K: logits_to_keep)
            logits = logits[:, -logits_to_keep - 1 : -1].float() / self.temperature
            comp = ids[:, -logits_to_keep:]
            k = torch.arange(logits_to_keep, device=ids.device)[None, :]
            col = (k + (logits_to_keep - n_completion)[:, None]).clamp(max=logits_to_keep - 1)
            aligned = torch.gather(logits, 1, col[..., None].expand(-1, -1, logits.size(-1)))
            valid = k < n_completion[:, None]
            lp = selective_log_softmax(aligned, comp.masked_fill(~valid, 0)) * valid
            logps.append(lp)
            if compute_entropy:
                entropies.append(entropy_from_logits(aligned) * valid)
        return torch.cat(logps), (torch.cat(entropies) if compute_entropy else None), None
