"""LLaVA's trainer with GETok: tokens and rows set up before training, the box-token loss, GETok files in
every checkpoint. ``register()`` installs :class:`GETokTrainer` as ``llava.train.train.LLaVATrainer``, so
LLaVA's own ``train()`` builds it at the point where model, tokenizer and data are all ready (after LoRA and
after LLaVA's own token additions: the GETok rows are added after any LoRA injection, as they must be).
"""
from __future__ import annotations

import functools
import os
import types
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..atomic import atomic_path
from ..vocab import GETokConfig
from .compat import apply_compat_fixes

apply_compat_fixes()  # fix 3 before llava.train is imported

from llava.train.llava_trainer import LLaVATrainer  # noqa: E402

from .builder import copy_into_parameters  # noqa: E402
from .box_loss import IGNORE_INDEX, TokenTable, box_token_loss, shifted_targets  # noqa: E402
from .rows import ROWS_ATTR, attach_trainable_rows, fold_rows_into_state, getok_rows_values  # noqa: E402
from .sidecar import ROWS_FILE, TOWER_FILE, Sidecar, save_tensors_atomic, write_sidecar  # noqa: E402
from .tokens import INITS, add_getok_tokens, check_token_ids, init_getok_rows, resize_embeddings  # noqa: E402

ROW_MODES = ("auto", "full", "delta")
LEAN = "lean"  # the trainer's capture mode in which LLaMA's forward skips its full-length logits and loss
DATA_ORDERS = ("shuffle", "file")


@dataclass(frozen=True)
class GETokSettings:
    """GETok options of a training run (``python -m llava_getok.train --getok_* ...``).

    grid, rounds, offset_levels, schedule, mode: the GETok config (spec sections 2-5).
    init: initialisation of the new rows, "sincos2d" (default) or "mean".
    grid_weight, box_weight: lambda_grid, lambda_box of the box-token loss; both 0 = plain LLaVA loss.
    sigma: width of the soft grid target in cells; offset_sigma: the same over offset tokens (0 = one-hot).
    rows: "auto" trains only the GETok rows (delta) under LoRA / QLoRA / frozen backbone / projector-only
        tuning and everything under full fine-tuning; "full" or "delta" force one.
    train_vision_tower: also train the CLIP tower (LLaVA freezes it and runs it under no_grad).
    check_data: distinct records to run through LLaVA's preprocessing check before training, spread over the
        file (-1: all, 0: none); repeated records are checked once.
    data_order: "shuffle" (the Trainer's random order) or "file": the records in the data file's order, for a
        curriculum written into the file (each process of a multi-GPU run takes its share of every batch).
    """

    grid: int = 32
    rounds: int | None = None
    offset_levels: int = 3
    schedule: str = "halving"
    mode: str = "inline"
    init: str = "sincos2d"
    grid_weight: float = 0.5
    box_weight: float = 0.5
    sigma: float = 1.0
    offset_sigma: float = 0.0
    rows: str = "auto"
    train_vision_tower: bool = False
    check_data: int = -1
    data_order: str = "shuffle"

    def __post_init__(self):
        if self.init not in INITS:
            raise ValueError(f"--getok_init must be one of {INITS}, got {self.init!r}")
        if self.data_order not in DATA_ORDERS:
            raise ValueError(f"--getok_data_order must be one of {DATA_ORDERS}, got {self.data_order!r}")
        if self.rows not in ROW_MODES:
            raise ValueError(f"--getok_rows must be one of {ROW_MODES}, got {self.rows!r}")
        for name in ("grid_weight", "box_weight", "sigma", "offset_sigma"):
            if getattr(self, name) < 0:
                raise ValueError(f"--getok_{name} must be >= 0, got {getattr(self, name)}")
        self.config()  # validates grid/rounds/mode

    def config(self) -> GETokConfig:
        return GETokConfig(grid=self.grid, rounds=self.rounds, offset_levels=self.offset_levels,
                           schedule=self.schedule, mode=self.mode)

    @property
    def loss_on(self) -> bool:
        return self.grid_weight > 0 or self.box_weight > 0


@dataclass
class GETokState:
    """What :func:`prepare_for_getok` set up, kept by the trainer."""

    config: GETokConfig
    ids: list[int]
    table: TokenTable
    rows_mode: str
    new_rows: int
    vocab_size: int


def unwrap_llava(model):
    """The LlavaLlamaForCausalLM inside DeepSpeed / DDP / peft wrappers."""
    while hasattr(model, "module") and not hasattr(model, "get_vision_tower"):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def _rows_mode(settings: GETokSettings, args, embeddings_frozen: bool) -> str:
    """LLaVA's --freeze_backbone lives in its ModelArguments, which the trainer never sees: a frozen
    backbone shows as a frozen input embedding matrix."""
    if settings.rows != "auto":
        return settings.rows
    frozen = (getattr(args, "lora_enable", False) or getattr(args, "bits", 16) in (4, 8)
              or getattr(args, "tune_mm_mlp_adapter", False) or embeddings_frozen)
    return "delta" if frozen else "full"


def reload_tower_float32(tower) -> None:
    """Put the tower's own float32 weights back (from ``tower.vision_tower_name``, as LLaVA loaded them)."""
    from transformers import CLIPVisionModel

    fresh = CLIPVisionModel.from_pretrained(tower.vision_tower_name, dtype=torch.float32)
    tower.vision_tower.to(dtype=torch.float32)
    tower.vision_tower.load_state_dict(fresh.state_dict())


def enable_vision_tower_training(model, dtype) -> None:
    """Train LLaVA's CLIP tower: unfreeze it and run its forward with gradients (LLaVA decorates
    ``CLIPVisionTower.forward`` with ``@torch.no_grad()``; the undecorated function is ``__wrapped__``)."""
    tower = model.get_vision_tower()
    tower.vision_tower.to(dtype=dtype)
    tower.vision_tower.requires_grad_(True)
    plain = getattr(type(tower).forward, "__wrapped__", None)
    if plain is None:
        raise TypeError(f"{type(tower).__name__}.forward has no __wrapped__: cannot run it with gradients")
    tower.forward = types.MethodType(plain, tower)


def check_projector(model) -> None:
    """Refuse a ``--mm_projector_type`` that the model's existing projector does not have.

    LLaVA's ``initialize_vision_modules`` builds a projector only when the model has none, but writes the
    requested type into the config anyway: the old projector trains, and the checkpoint names a projector its
    weights do not fit, so it does not load after training."""
    from llava.model.multimodal_projector.builder import build_vision_projector

    have = getattr(model.get_model(), "mm_projector", None)
    if have is None or not getattr(model.config, "mm_hidden_size", None):
        return
    shapes = lambda m: {k: tuple(getattr(p, "ds_shape", p.shape)) for k, p in m.named_parameters()}  # noqa: E731
    with torch.device("meta"):
        want = build_vision_projector(model.config)
    have = shapes(have)
    if have != shapes(want):
        linears = sum(1 for k in have if k.endswith("weight"))
        guess = "linear" if "weight" in have else f"mlp{linears}x_gelu"
        raise ValueError(
            f"--mm_projector_type {model.config.mm_projector_type}: the model "
            f"({getattr(model.config, '_name_or_path', '') or 'given'}) already has a projector of another shape "
            f"(looks like {guess!r}: {have}). LLaVA would keep training that one and save a config that "
            f"does not load; pass --mm_projector_type {guess}, or start from a model without a projector")


def prepare_for_getok(model, tokenizer, args, settings: GETokSettings, train_dataset=None) -> GETokState:
    """Add the GETok tokens, resize and initialise the rows, choose what trains, check the data."""
    cfg = settings.config()
    base = unwrap_llava(model)
    check_projector(base)
    embeddings_frozen = not base.get_input_embeddings().weight.requires_grad
    ids = add_getok_tokens(tokenizer, cfg)
    check_token_ids(tokenizer, cfg)
    rows_now = base.get_input_embeddings().weight
    rows_now = rows_now.ds_shape[0] if hasattr(rows_now, "ds_shape") else rows_now.shape[0]
    size = max(len(tokenizer), rows_now)
    n_old = resize_embeddings(base, size)
    new = [i for i in ids if i >= n_old]
    if new and len(new) != len(ids):
        raise ValueError(f"{len(ids) - len(new)} GETok tokens already had rows and {len(new)} did not: the "
                         f"tokenizer and the model disagree")
    if new:
        init_getok_rows(base, ids, cfg, settings.init, n_old=n_old)
    mode = _rows_mode(settings, args, embeddings_frozen)
    if mode == "delta":
        attach_trainable_rows(base, ids)
    else:
        base.get_input_embeddings().weight.requires_grad_(True)
        base.get_output_embeddings().weight.requires_grad_(True)
    compute = torch.bfloat16 if getattr(args, "bf16", False) else torch.float32
    tower = base.get_vision_tower()
    half = (torch.float16, torch.bfloat16)
    if tower is not None and compute == torch.float32 and tower.vision_tower.dtype in half \
            and (settings.train_vision_tower or not torch.cuda.is_available()):
        # LLaVA's train() casts the tower to float16 even for float32 training: slow or unsupported on CPU, and
        # a tower that trains needs float32 weights. Reload it at full precision instead of upcasting the
        # rounded weights.
        reload_tower_float32(tower)
    if settings.train_vision_tower:
        enable_vision_tower_training(base, compute)
    if train_dataset is not None and settings.check_data != 0 and hasattr(train_dataset, "list_data_dict"):
        from .check import check_records, raise_on_problems

        data_args = train_dataset.data_args
        source = getattr(data_args, "data_path", "training data")
        report = check_records(train_dataset.list_data_dict, tokenizer, version=None,
                               mm_use_im_start_end=getattr(data_args, "mm_use_im_start_end", False),
                               limit=settings.check_data, source=source)
        raise_on_problems(report, source)
    return GETokState(cfg, ids, TokenTable.from_ids(cfg, ids), mode, len(new), size)


class GETokTrainer(LLaVATrainer):
    """LLaVATrainer + GETok. Settings come from the class attribute set by :func:`install_trainer_hook`."""

    getok_settings: GETokSettings = GETokSettings()

    def __init__(self, model=None, tokenizer=None, args=None, **kwargs):
        if tokenizer is None:  # newer callers name it processing_class
            tokenizer = kwargs.pop("processing_class", None)
        self.getok = prepare_for_getok(model, tokenizer, args, self.getok_settings, kwargs.get("train_dataset"))
        if getattr(args, "local_rank", -1) in (-1, 0):
            g = self.getok
            print(f"GETok: grid {g.config.grid}, rounds {g.config.rounds}, mode {g.config.mode}: {len(g.ids)} tokens "
                  f"(ids {min(g.ids)}-{max(g.ids)}, {g.new_rows} new rows, init {self.getok_settings.init}), "
                  f"vocabulary {g.vocab_size}, trainable rows: {g.rows_mode}, loss weights grid "
                  f"{self.getok_settings.grid_weight} box {self.getok_settings.box_weight}")
        self._getok_tokenizer = tokenizer
        self._getok_sums: dict[str, float] = {}
        self._getok_labels = self._getok_hidden = None
        self._getok_capturing = False
        if self.getok_settings.loss_on:
            _capture_loss_inputs(unwrap_llava(model), self)
        super().__init__(model=model, tokenizer=tokenizer, args=args, **kwargs)

    def _get_train_sampler(self, *args, **kwargs):
        if self.getok_settings.data_order == "file" and self.train_dataset is not None:
            if getattr(self.args, "group_by_modality_length", False):
                raise ValueError("--getok_data_order file and --group_by_modality_length True both set the "
                                 "order of the records; pass one")
            return torch.utils.data.SequentialSampler(self.train_dataset)
        return super()._get_train_sampler(*args, **kwargs)

    # -- loss ------------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        s = self.getok_settings
        if not s.loss_on:  # LLaVA's own loss path, untouched: plain LLaVA training bit for bit
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        # In training nobody reads the full logits: LLaMA's forward then computes neither them nor its loss, and
        # both losses are scored here on the positions that have a target (labelled_lm_loss).
        lean = (model.training and not return_outputs and self.label_smoother is None
                and self.compute_loss_func is None and not self.model_accepts_loss_kwargs)
        self._getok_capturing = LEAN if lean else True
        try:
            if lean:
                outputs = model(**inputs)
                lm = outputs.loss  # None unless LLaVA's multimodal preparation did not run
            else:
                lm, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                                   num_items_in_batch=num_items_in_batch)
        finally:
            self._getok_capturing = False
        labels, hidden = self._getok_labels, self._getok_hidden
        self._getok_labels = self._getok_hidden = None
        if labels is None:  # the forward did not go through LLaVA's multimodal preparation
            labels = inputs.get("labels")
        if labels is None or labels.shape[:2] != (hidden if hidden is not None else outputs.logits).shape[:2]:
            raise ValueError("box-token loss: no labels aligned with the logits (LLaVA's "
                             "prepare_inputs_labels_for_multimodal was not called in this forward)")
        host = labels.detach().cpu().numpy()
        head = unwrap_llava(model).get_output_embeddings()
        if lm is None:
            lm, scores = labelled_lm_loss(head, hidden, host)
        elif hidden is not None:
            # the LM head again, on the scored positions only (its hooks, e.g. the GETok row deltas, included):
            # the loss then adds no second full-size gradient to the logits
            flat = hidden.reshape(-1, hidden.shape[-1])
            scores = lambda rows: head(flat[rows.to(flat.device)])  # noqa: E731
        else:
            scores = outputs.logits
        parts = box_token_loss(scores, host, self.getok.table, sigma=s.sigma, with_box=s.box_weight > 0,
                               offset_sigma=s.offset_sigma)
        total = lm
        if s.grid_weight > 0:
            total = total + s.grid_weight * parts["grid"]
        if s.box_weight > 0:
            total = total + s.box_weight * parts["box"]
        self._accumulate({"loss_lm": lm, "loss_grid": parts["grid"], "loss_box": parts["box"]})
        return (total, outputs) if return_outputs else total

    def _accumulate(self, values):
        # summed as tensors and read once per log: a float() per step would wait for the GPU every step
        for k, v in values.items():
            v = v.detach()
            self._getok_sums[k] = self._getok_sums[k] + v if k in self._getok_sums else v
        self._getok_sums["_n"] = self._getok_sums.get("_n", 0) + 1

    def log(self, logs, *args, **kwargs):
        n = self._getok_sums.pop("_n", 0)
        if n and "loss" in logs:
            logs.update({k: round(float(v) / n, 6) for k, v in self._getok_sums.items()})
            self._getok_sums = {}
        return super().log(logs, *args, **kwargs)

    # -- saving ----------------------------------------------------------------------------------------
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
        peft_model = self.model
        peft_model.save_pretrained = functools.partial(type(peft_model).save_pretrained, peft_model,
                                                       save_embedding_layers=False)
        try:
            return super()._save(output_dir, state_dict=state_dict)
        finally:
            del peft_model.save_pretrained

    def _save_checkpoint(self, model, trial, metrics=None):
        super()._save_checkpoint(model, trial, metrics)
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        self.write_getok_files(folder)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        """Resume also what the Trainer does not reload for a PeftModel (LLaVA#1200): the GETok row deltas,
        LLaVA's non-LoRA weights (projector) and a trained vision tower."""
        super()._load_from_checkpoint(resume_from_checkpoint, model=model)
        from safetensors.torch import load_file

        from .sidecar import read_rows, read_sidecar

        base = unwrap_llava(model if model is not None else self.model)
        folder = resume_from_checkpoint
        rows_module = getattr(base, ROWS_ATTR, None)
        sidecar = read_sidecar(folder)
        if rows_module is not None and sidecar is not None:
            saved = read_rows(folder, sidecar)
            index = saved["token_ids"].to(rows_module.ids.device)
            from .tokens import _gathered

            params = [base.get_input_embeddings().weight, base.get_output_embeddings().weight,
                      rows_module.input_delta, rows_module.output_delta]
            with _gathered(params), torch.no_grad():  # delta = saved effective rows - the frozen matrix rows
                emb = base.get_input_embeddings().weight[index].float()
                head = base.get_output_embeddings().weight[index].float()
                rows_module.input_delta.copy_((saved["input_rows"].to(emb.device) - emb).to(rows_module.input_delta.dtype))
                rows_module.output_delta.copy_((saved["output_rows"].to(head.device) - head).to(rows_module.output_delta.dtype))
        non_lora = os.path.join(folder, "non_lora_trainables.bin")
        if os.path.exists(non_lora) and hasattr(self.model, "peft_config"):
            state = {k: v for k, v in torch.load(non_lora, map_location="cpu").items() if f"{ROWS_ATTR}." not in k}
            copy_into_parameters(self.model, state, non_lora)
        tower_file = os.path.join(folder, TOWER_FILE)
        if os.path.exists(tower_file):
            base.get_vision_tower().vision_tower.load_state_dict(load_file(tower_file))

    def train(self, *args, **kwargs):
        out = super().train(*args, **kwargs)
        self.write_getok_files(self.args.output_dir)
        return out

    def checkpoint_kind(self) -> str:
        if getattr(self.args, "tune_mm_mlp_adapter", False):
            return "projector"
        return "lora" if getattr(self.args, "lora_enable", False) else "full"

    def write_getok_files(self, folder) -> None:
        """Sidecar, GETok rows, tokenizer (and, for LoRA, config + non-LoRA weights) into ``folder``: every
        checkpoint, intermediate ones included, can be loaded back on its own (docs/pitfalls.md)."""
        base = unwrap_llava(self.model)
        rows = getok_rows_values(base, self.getok.ids)  # collective under ZeRO-3: every rank calls it
        kind = self.checkpoint_kind()
        non_lora = None
        if kind == "lora":
            from llava.train.train import get_peft_state_non_lora_maybe_zero_3

            non_lora = get_peft_state_non_lora_maybe_zero_3(self.model.named_parameters())
        tower = None
        if self.getok_settings.train_vision_tower:
            from .tokens import _gathered

            params = list(base.get_vision_tower().vision_tower.parameters())
            with _gathered(params):
                tower = {k: v.detach().float().cpu().clone()
                         for k, v in base.get_vision_tower().vision_tower.state_dict().items()}
        if not self.args.should_save:
            return
        os.makedirs(folder, exist_ok=True)
        save_tensors_atomic(os.path.join(folder, ROWS_FILE), rows)
        if tower is not None:
            save_tensors_atomic(os.path.join(folder, TOWER_FILE), tower)
        self._getok_tokenizer.save_pretrained(folder)
        if non_lora is not None:
            base.config.save_pretrained(folder)
            with atomic_path(os.path.join(folder, "non_lora_trainables.bin")) as tmp:
                torch.save(non_lora, tmp)
        s = self.getok_settings
        aspect = getattr(base.config, "image_aspect_ratio", "square")
        write_sidecar(folder, Sidecar(
            getok=self.getok.config.to_dict(), tokens=list(self.getok.config.tokens()), token_ids=list(self.getok.ids),
            vocab_size=self.getok.vocab_size, tokenizer_legacy=getattr(self._getok_tokenizer, "legacy", None),
            image_aspect_ratio=aspect, frame="pad" if aspect == "pad" else "orig", kind=kind,
            base_model=getattr(base.config, "_name_or_path", None) or None, init=s.init,
            loss={k: v for k, v in asdict(s).items() if k in ("grid_weight", "box_weight", "sigma", "offset_sigma")},
            vision_tower_trained=s.train_vision_tower))


def _capture_loss_inputs(model, trainer) -> None:
    """Record, during the trainer's forward, what the box-token loss needs: the labels LLaVA builds inside
    forward (image positions inserted, re-padded), which line up with the logits, and the hidden states the
    LM head receives. Wraps the instance's preparation method and adds a forward pre-hook on the head. Outside
    the ``LEAN`` mode LLaVA's forward runs unchanged, so its LM loss is the plain one bit for bit; in it, the
    forward gets no labels and its head sees the last position only, and the trainer scores the labelled
    positions itself (:func:`labelled_lm_loss`)."""
    original = model.prepare_inputs_labels_for_multimodal
    if getattr(original, "__getok_capture__", False):
        original.__getok_trainer__[0] = trainer
        return
    owner = [trainer]

    def prepare_inputs_labels_for_multimodal(*args, **kwargs):
        out = original(*args, **kwargs)
        if out[-1] is not None and owner[0]._getok_capturing:
            owner[0]._getok_labels = out[-1]
            if owner[0]._getok_capturing == LEAN:  # no loss in LLaMA's forward: the trainer computes it
                out = (*out[:-1], None)
        return out

    def keep_head_input(module, args):
        t = owner[0]
        if t._getok_capturing:
            t._getok_hidden = args[0]
            if t._getok_capturing == LEAN and t._getok_labels is not None:
                return (args[0][:, -1:],)  # the logits of the last position only; the trainer scores the rest

    prepare_inputs_labels_for_multimodal.__getok_capture__ = True
    prepare_inputs_labels_for_multimodal.__getok_trainer__ = owner
    model.prepare_inputs_labels_for_multimodal = prepare_inputs_labels_for_multimodal
    model.get_output_embeddings().register_forward_pre_hook(keep_head_input)


def labelled_lm_loss(head, hidden: torch.Tensor, labels):
    """LLaVA's LM loss (transformers' ``ForCausalLMLoss``: ``hidden[:, t]`` predicts ``labels[:, t + 1]``, mean
    cross-entropy over the targets that are not -100) with the LM ``head`` applied to the positions that have a
    target only, and a function ``rows -> logits`` over those positions for :func:`box_token_loss`.

    Most positions of a LLaVA sequence (image, prompt, padding) have no target: the full (B, T, V) logits, their
    log-softmax and their gradient were most of the head's cost (on the demo's model about a fifth of a step)
    and, for a 7B vocabulary, gigabytes of memory. Same value up to float rounding (summation order)."""
    shifted = shifted_targets(labels)
    rows = np.flatnonzero(shifted != IGNORE_INDEX)
    flat = hidden.reshape(len(shifted), -1)
    logits = head(flat[torch.from_numpy(rows).to(flat.device)])
    lm = F.cross_entropy(logits.float(), torch.from_numpy(shifted[rows]).to(logits.device))
    return lm, lambda at: logits[torch.from_numpy(np.searchsorted(rows, at.numpy())).to(logits.device)]


def install_trainer_hook(settings: GETokSettings | None = None, **kwargs) -> bool:
    """Make LLaVA's train() use :class:`GETokTrainer` (with ``settings``); True if this call installed it."""
    import llava.train.train as train_mod

    if settings is None and kwargs:
        settings = GETokSettings(**kwargs)
    if settings is not None:
        GETokTrainer.getok_settings = settings
    if train_mod.LLaVATrainer is GETokTrainer:
        return False
    train_mod.LLaVATrainer = GETokTrainer
    return True
