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

Full fine-tuning with a KL term gets a reference that is a copy of the policy (trl would reload it from the
config's path and lose in-memory GETok rows); under LoRA the reference is the model with its adapters and its
GETok-row deltas disabled: the starting model.
"""
from __future__ import annotations

import contextlib
import copy

import torch
from trl import GRPOConfig, GRPOTrainer
from trl.models.utils import unwrap_model_for_generation
from trl.trainer.utils import entropy_from_logits, pad, selective_log_softmax

from ..llava import inputs as model_inputs
from ..llava.prepare import unwrap_llava
from ..records import TASK_SHAPES
from ..training.rows import ROWS_ATTR


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


class LlavaGRPOTrainer(GRPOTrainer):
    """GRPOTrainer for LLaVA models. Dataset rows: ``prompt`` (rendered text with ``<image>``), ``image_path``,
    plus any columns the rewards read (``getok``, ``first_answer``).

    image_processor: the vision tower's processor (LLaVA's builder returns it).
    logits_processor: optional list of transformers logits processors for rollouts (grammar constraint).
    first_answers: optional ``f(trainer, rows) -> rows`` run on each generation batch before the rollouts
        (:class:`PolicyFirstAnswers`: the refine stage refines the policy's own first answers).
    """

    def __init__(self, model, tokenizer, image_processor, reward_funcs, args: GRPOConfig, train_dataset,
                 peft_config=None, logits_processor=None, callbacks=None, first_answers=None):
        self.image_processor = image_processor
        self.rollout_logits_processor = logits_processor
        self.first_answers = first_answers  # refine stage: rewrites a batch's rows before the rollouts
        self._rollout_images = None  # the current generation batch's pixels, while trl generates and scores
        # trl builds a full-finetuning reference with AutoModelForCausalLM.from_pretrained(config path), which
        # loses a model's in-memory GETok rows; copy the policy instead (PEFT: adapters disabled, nothing to copy).
        beta = args.beta
        own_ref = beta != 0.0 and peft_config is None and not hasattr(model, "peft_config")
        ref = copy.deepcopy(model).eval().requires_grad_(False) if own_ref else None
        if own_ref:
            args.beta = 0.0
        super().__init__(model=model, reward_funcs=reward_funcs, args=args, train_dataset=train_dataset,
                         processing_class=tokenizer, peft_config=peft_config, callbacks=callbacks)
        if own_ref:
            args.beta = self.beta = beta
            self.ref_model = self.accelerator.prepare_model(ref, evaluation_mode=True)
        if self.ref_model is None and beta != 0.0:
            _reference_without_getok_rows(self.accelerator.unwrap_model(self.model))

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
            unwrap_model_for_generation(
                self.model_wrapped, self.accelerator,
                gather_deepspeed3_params=self.args.ds3_gather_for_generation,
                generation_kwargs=self.generation_kwargs,
                gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs,
            ) as unwrapped,
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


class PolicyFirstAnswers:
    """Refine stage on the policy's own first answers (as at inference), not the ones stored in the data.

    For each distinct row of a generation batch: greedy first answer to the first question (under the GETok
    grammar restricted to the shape the task asks for), then the refine question re-rendered around it (the
    data's first answer, which the question restates, is replaced by the model's). ``first_answer`` and
    ``prompt`` of the rows are rewritten; the rewards then judge the refinement of the model's answer.
    """


    def __init__(self, conv_mode: str, cfg, token_ids: dict[str, int], max_new_tokens: int):
        self.conv_mode, self.token_ids, self.max_new_tokens = conv_mode, token_ids, max_new_tokens
        self.grid_cfg = cfg.with_mode("grid")
        self.getok_ids = set(token_ids.values())

    def __call__(self, trainer, rows):
        import json

        from transformers import GenerationConfig

        from ..generation import GETokLogitsProcessor, space_token_ids

        tok = trainer.processing_class
        first_of = {}  # prompt -> index of its first row (a group's G rows share a prompt)
        for k, x in enumerate(rows):
            first_of.setdefault(x["prompt"], k)
        by_kind: dict[str | None, list[int]] = {}
        for k in first_of.values():
            task = json.loads(rows[k]["getok"])["task"]
            by_kind.setdefault(TASK_SHAPES.get(task), []).append(k)
        greedy = GenerationConfig(do_sample=False, max_new_tokens=self.max_new_tokens,
                                  pad_token_id=tok.pad_token_id, eos_token_id=trainer.eos_token_ids)
        answer = {}
        for only, ks in by_kind.items():
            turns = [json.loads(rows[k]["conversation"]) for k in ks]
            prompts = [model_inputs.render_prompt(t[: self._first_gpt(t, rows[k])], self.conv_mode)
                       for t, k in zip(turns, ks)]
            proc = GETokLogitsProcessor(self.token_ids, self.grid_cfg, tok.eos_token_id, len(tok),
                                        never_ids=[tok.bos_token_id], only=only, max_new_tokens=self.max_new_tokens,
                                        space_ids=space_token_ids(tok))
            ids = trainer._llava_generate([model_inputs.prompt_ids(p, tok) for p in prompts],
                                          trainer._rollout_images[ks], greedy, [proc])
            for k, t, a in zip(ks, turns, ids):
                answer[rows[k]["prompt"]] = (t, self._text(tok, a, trainer.eos_token_ids))
        out = []
        for x in rows:
            turns, first = answer[x["prompt"]]
            out.append({**x, "prompt": self._refine_prompt(turns, x, first), "first_answer": first})
        return out

    def _text(self, tok, ids, eos) -> str:
        from ..generation import space_token_ids

        ids = [i for i in ids if i not in eos]
        if ids and ids[0] in space_token_ids(tok):  # the template's space before the answer, not part of it
            ids = ids[1:]
        if all(i in self.getok_ids for i in ids):  # the GETok tokens exactly, as the converter writes them
            return "".join(tok.convert_ids_to_tokens(ids))
        return tok.decode(ids, skip_special_tokens=False)

    @staticmethod
    def _first_gpt(turns, row) -> int:
        k = next((i for i, t in enumerate(turns) if t["from"] == "gpt"), None)
        if k is None:
            raise ValueError(f"record {row.get('id')!r}: a refine conversation needs its first answer turn")
        return k

    def _refine_prompt(self, turns, row, first: str) -> str:
        k = self._first_gpt(turns, row)
        question = turns[-1]["value"]
        if row["first_answer"] not in question:
            raise ValueError(f"record {row.get('id')!r}: the refine question does not restate the first answer "
                             f"{row['first_answer']!r}; cannot re-ask it about the model's own answer")
        new = [*turns[:k], {"from": "gpt", "value": first}, *turns[k + 1 : -1],
               {"from": "human", "value": question.replace(row["first_answer"], first)}]
        return model_inputs.render_prompt(new, self.conv_mode)
