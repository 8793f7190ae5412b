"""LLaVA's trainer with GETok. ``register(settings)`` makes ``llava.train.train.LLaVATrainer`` build a
:class:`GETokTrainer` with those settings, so LLaVA's own ``train()`` builds it where model, tokenizer and data are
all ready. The trainer is LLaVATrainer plus three jobs, each in a module of its own: preparation before the first
step (``prepare``), the loss of a step (``loss``), the GETok files of every checkpoint (``checkpoint``).
"""
from __future__ import annotations

import functools
import os
from dataclasses import asdict

import torch

from ..patching import PROCESS
from .compat import apply_compat_fixes

apply_compat_fixes()  # fix 3 before llava.train is imported

from llava.train.llava_trainer import LLaVATrainer  # noqa: E402

from ..formats import describe, same_tokens  # noqa: E402
from ..frames import frame_of  # noqa: E402
from ..vocab import GETokConfig  # noqa: E402
from .checkpoint import load_getok_files, tower_weights, write_getok_files  # noqa: E402
from ..training.step import step_loss  # noqa: E402
from .capture import capture  # noqa: E402
from .prepare import prepare_for_getok, unwrap_llava  # noqa: E402
from ..training.rows import (  # noqa: E402
    ROWS_ATTR, check_same_on_all_ranks, fold_rows_into_state, getok_rows_values, saving_adapter_only)
from ..training.settings import FormatError, GETokSettings  # noqa: E402
from ..training.sidecar import ROWS_FILE, SIDECAR, Sidecar, read_sidecar  # noqa: E402


class GETokTrainer(LLaVATrainer):
    """LLaVATrainer + GETok, configured by ``settings`` (:class:`GETokSettings`); ``template``: the conversation
    template of the run (LLaVA's ``--version``), recorded in every checkpoint."""

    def __init__(self, model=None, tokenizer=None, args=None, settings: GETokSettings | None = None,
                 template: str | None = None, **kwargs):
        if tokenizer is None:  # newer callers name it processing_class
            tokenizer = kwargs.pop("processing_class", None)
        self.settings = settings = settings or GETokSettings()
        self.template = template
        self.getok = prepare_for_getok(model, tokenizer, args, settings, kwargs.get("train_dataset"))
        g = self.getok
        if getattr(args, "local_rank", -1) in (-1, 0):
            f = g.format
            what = (f"grid {f.grid}, rounds {f.rounds}, mode {f.mode}" if isinstance(f, GETokConfig)
                    else f"location format {describe(f)}")
            ids = f"ids {min(g.ids)}-{max(g.ids)}, {g.new_rows} new rows, init {settings.init}" if g.ids else "none added"
            loss = (f"loss weights grid {settings.grid_weight} box {settings.box_weight}" if self.loss_on
                    else "LLaVA's plain loss")
            print(f"GETok: {what}: {len(g.ids)} tokens ({ids}), vocabulary {g.vocab_size}, trainable rows: "
                  f"{g.rows_mode}, {loss}")
        self._getok_tokenizer = tokenizer
        self._getok_sums: dict[str, torch.Tensor | int] = {}
        super().__init__(model=model, processing_class=tokenizer, args=args, **kwargs)

    @property
    def loss_on(self) -> bool:
        """The box-token loss (or the bins' 1D loss) is on: weights > 0 and a format that adds tokens (text coordinates
        add none: LLaVA's plain loss, whatever the weights say)."""
        return self.settings.loss_on and self.getok.table is not None

    def _get_train_sampler(self, *args, **kwargs):
        if self.settings.data_order == "file" and self.train_dataset is not None:
            if getattr(self.args, "group_by_modality_length", False):
                raise ValueError("--getok_data_order file and --group_by_modality_length True both set the "
                                 "order of the records; pass one")
            return torch.utils.data.SequentialSampler(self.train_dataset)
        return super()._get_train_sampler(*args, **kwargs)

    # -- the loss of one step -----------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self.loss_on:  # LLaVA's own loss path, untouched: plain LLaVA training bit for bit
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        # In training nobody reads the full logits: LLaMA's forward then computes neither them nor its loss, and
        # both losses are scored on the positions that have a target (llava_getok.training.step).
        lean = (model.training and not return_outputs and self.label_smoother is None
                and self.compute_loss_func is None and not self.model_accepts_loss_kwargs)
        llava = unwrap_llava(model)
        with capture(llava, lean) as forward:
            if lean:
                outputs = model(**inputs)
                lm = outputs.loss  # None unless LLaVA's multimodal preparation did not run
            else:
                lm, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                                   num_items_in_batch=num_items_in_batch)
        captured = forward.captured(outputs, lm, labels=inputs.get("labels"))
        total, parts = step_loss(captured, llava.get_output_embeddings(), self.getok.table, self.settings)
        self._accumulate(parts)
        return (total, outputs) if return_outputs else total

    def _accumulate(self, values):
        # summed as tensors and read once per log: a float() per step would wait for the GPU every step
        for k, v in values.items():
            v = v.detach()
            self._getok_sums[k] = self._getok_sums[k] + v if k in self._getok_sums else v
        self._getok_sums["_n"] = self._getok_sums.get("_n", 0) + 1

    def log(self, logs, *args, **kwargs):
        n = self._getok_sums.pop("_n", 0)
        if n and "loss" in logs:  # the Trainer's periodic log: every rank comes here, as for its own "loss"
            names = sorted(self._getok_sums)
            device = self.args.device
            means = torch.stack([self._getok_sums[k].to(device, torch.float32) for k in names]) / n
            # the mean over ranks, as the Trainer logs "loss" (each rank saw its own share of the batch)
            means = self._nested_gather(means).view(-1, len(names)).mean(0)
            logs.update({k: round(float(v), 6) for k, v in zip(names, means)})
            self._getok_sums = {}
        return super().log(logs, *args, **kwargs)

    # -- checkpoints ----------------------------------------------------------------------------------------
    def _save(self, output_dir=None, state_dict=None):
        base = unwrap_llava(self.model)
        if getattr(base, ROWS_ATTR, None) is not None and not hasattr(self.model, "peft_config") \
                and not getattr(self.args, "tune_mm_mlp_adapter", False):
            # a full checkpoint with frozen matrices: write the effective rows in, drop the delta keys
            state = state_dict if state_dict is not None else self.model.state_dict()
            state_dict = fold_rows_into_state(state, getok_rows_values(base, self.getok.ids))
        if not hasattr(self.model, "peft_config"):
            return super()._save(output_dir, state_dict=state_dict)
        # peft's save_embedding_layers="auto" sees the resized vocabulary and writes both full matrices into
        # every intermediate adapter; the GETok rows are in getok_rows.safetensors already.
        with saving_adapter_only(self.model):
            return super()._save(output_dir, state_dict=state_dict)

    def _save_checkpoint(self, model, trial, metrics=None):
        super()._save_checkpoint(model, trial, metrics)
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        self.save_getok_files(folder)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        self.check_resumable(resume_from_checkpoint)
        super()._load_from_checkpoint(resume_from_checkpoint, model=model)
        peft_model = self.model if hasattr(self.model, "peft_config") else None
        load_getok_files(unwrap_llava(model if model is not None else self.model), peft_model, resume_from_checkpoint)

    def check_resumable(self, folder) -> None:
        """Refuse, in one line, a checkpoint of another location format or vocabulary. LLaVA's train() resumes from
        any ``checkpoint-*`` in ``--output_dir``, so rerunning another configuration into the same folder would
        otherwise stop in torch's load_state_dict with a size mismatch of the embedding matrix."""
        saved = read_sidecar(folder)
        if saved is None:
            raise FormatError(f"GETok: {folder} has no {SIDECAR}: a checkpoint of a run without GETok, which this "
                             "run cannot resume (LLaVA resumes from any checkpoint-* in --output_dir: use a new "
                             "--output_dir or remove that folder)")
        fmt, g = saved.location_format, self.getok
        if not same_tokens(fmt, g.format) or saved.vocab_size != g.vocab_size:
            raise FormatError(f"GETok: {folder} was trained on {describe(fmt)} with a vocabulary of {saved.vocab_size}, "
                             f"this run trains {describe(g.format)} with {g.vocab_size}: it cannot resume it (LLaVA "
                             "resumes from any checkpoint-* in --output_dir: use a new --output_dir or remove that "
                             "folder)")

    def train(self, *args, **kwargs):
        out = super().train(*args, **kwargs)
        ranks = self.save_getok_files(self.args.output_dir)
        if self.args.should_save:
            same = f", identical on all {ranks} ranks" if ranks > 1 else ""
            print(f"GETok: rows of {len(self.getok.ids)} tokens saved in {self.args.output_dir}/{ROWS_FILE}{same}")
        return out

    def checkpoint_kind(self) -> str:
        if getattr(self.args, "tune_mm_mlp_adapter", False):
            return "projector"
        return "lora" if getattr(self.args, "lora_enable", False) else "full"

    def save_getok_files(self, folder) -> int:
        """The GETok files of this run's checkpoint ``folder`` (llava_getok.llava.checkpoint). Every rank calls it:
        the rows (and a trained tower) are gathered and the ranks' rows compared first. Returns the number of
        ranks."""
        base = unwrap_llava(self.model)
        rows = getok_rows_values(base, self.getok.ids)
        ranks = check_same_on_all_ranks(rows, folder)
        kind = self.checkpoint_kind()
        non_lora = None
        if kind == "lora":
            from llava.train.train import get_peft_state_non_lora_maybe_zero_3

            non_lora = get_peft_state_non_lora_maybe_zero_3(self.model.named_parameters())
        tower = tower_weights(base) if self.settings.train_vision_tower else None
        if self.args.should_save:
            write_getok_files(folder, self._getok_tokenizer, self.sidecar(kind, base), rows, base.config, non_lora,
                              tower)
        return ranks

    def sidecar(self, kind: str, base) -> Sidecar:
        g = self.getok
        aspect = getattr(base.config, "image_aspect_ratio", "square")
        return Sidecar.of(
            g.format, g.ids, vocab_size=g.vocab_size, tokenizer_legacy=getattr(self._getok_tokenizer, "legacy", None),
            kind=kind, frame=frame_of(base), backend="llava",
            base_model=getattr(base.config, "_name_or_path", None) or None, template=self.template,
            processor={"image_aspect_ratio": aspect}, settings=asdict(self.settings),
            vision_tower_trained=self.settings.train_vision_tower)


def run_llava_train(attn_implementation: str) -> None:
    """LLaVA's own ``train()``, which reads its arguments from ``sys.argv`` and builds the trainer the hook installed
    (:func:`install_trainer_hook`)."""
    import llava.train.train as llava_train

    llava_train.train(attn_implementation=attn_implementation)


TRAINER_WHY = "LLaVA's train() builds the GETok trainer (llava_getok.llava.trainer)"


def install_trainer_hook(settings: GETokSettings | None = None, template: str | None = None) -> bool:
    """Make LLaVA's ``train()`` build a :class:`GETokTrainer` with ``settings`` and ``template`` (without settings:
    keep those of an earlier call, or the defaults). True if this call changed what LLaVA builds."""
    import llava.train.train as train_mod

    current = train_mod.LLaVATrainer
    installed = isinstance(current, functools.partial) and current.func is GETokTrainer
    if installed and (settings is None or (current.keywords["settings"], current.keywords["template"]) == (settings, template)):
        return False
    uninstall_trainer_hook()
    factory = functools.partial(GETokTrainer, settings=settings or GETokSettings(), template=template)
    PROCESS.replace(train_mod, "LLaVATrainer", functools.update_wrapper(factory, GETokTrainer), why=TRAINER_WHY)
    return True


def uninstall_trainer_hook() -> bool:
    """Give LLaVA's ``train()`` its own trainer back; True if one was installed."""
    return bool(PROCESS.undo(where=lambda p: p.why == TRAINER_WHY))
