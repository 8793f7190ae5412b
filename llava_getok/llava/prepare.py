"""Before the first step: the location format chosen (the settings' or the data's), its tokens added (GETok's; the
bins' ``<loc_k>``; none for text), the rows resized and initialised, what trains chosen, the data checked
(:func:`prepare_for_getok`), on the model LLaVA's ``train()`` built (after LoRA, so the GETok rows are added after any
LoRA injection, as they must be)."""
from __future__ import annotations

import types
from dataclasses import dataclass

import torch

from ..patching import model_patches
from ..formats import FORMAT_NAMES, BinsFormat, LocationFormat, data_formats, describe, format_name
from ..frames import frame_of, frames_differ
from ..vocab import GETokConfig
from ..training.bins_loss import BinsTable
from ..training.box_loss import TokenTable
from ..training.rows import attach_trainable_rows
from ..training.settings import FormatError, GETokSettings, TrainingDataError
from ..training.tokens import add_getok_tokens, check_token_ids, init_getok_rows, resize_embeddings


@dataclass
class GETokState:
    """What :func:`prepare_for_getok` set up, kept by the trainer. ``format``: the location format trained on;
    ``ids``: its tokens' ids (none for text); ``table``: what the format's loss indexes (None for text)."""

    format: LocationFormat
    ids: list[int]
    table: TokenTable | BinsTable | None
    rows_mode: str
    new_rows: int
    vocab_size: int


def unwrap_llava(model):
    """The LlavaLlamaForCausalLM inside DeepSpeed / DDP / accelerate / peft wrappers (the same parameters, not a
    copy); TypeError for anything that holds no LLaVA model."""
    while isinstance(getattr(model, "module", None), torch.nn.Module):  # DDP, DeepSpeed's engine
        model = model.module
    if hasattr(model, "get_base_model"):  # peft
        model = model.get_base_model()
    if not hasattr(model, "prepare_inputs_labels_for_multimodal"):
        raise TypeError(f"{type(model).__name__} is not a LLaVA model (no prepare_inputs_labels_for_multimodal)")
    return model


def rows_mode(settings: GETokSettings, args, embeddings_frozen: bool) -> str:
    """LLaVA's --freeze_backbone lives in its ModelArguments, which the trainer never sees: a frozen
    backbone shows as a frozen input embedding matrix."""
    if settings.rows not in ("auto", "factored"):
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
    model_patches(model).replace(tower, "forward", types.MethodType(plain, tower),
                                 why="the vision tower trains: its forward without LLaVA's no_grad")


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


def match_deepspeed_dtype(model, args) -> None:
    """Give every trainable parameter DeepSpeed's dtype (bf16 / fp16 with ``--bf16`` / ``--fp16``), the parameters
    created after ``zero.Init`` included (peft's float32 LoRA adapters, the float32 GETok row deltas): DeepSpeed keeps
    the float32 master copies itself and ZeRO-3 requires one dtype (its ``defragment`` asserts it)."""
    dtype = torch.bfloat16 if getattr(args, "bf16", False) else torch.float16 if getattr(args, "fp16", False) else None
    if dtype is None:
        return
    for p in model.parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype != dtype and not hasattr(p, "ds_id"):
            p.data = p.data.to(dtype)


def check_data_frame(base, train_dataset) -> None:
    """FormatError (one line) when the training records' ``getok.frame`` is not the frame the model sees (its
    ``image_aspect_ratio`` and its tower's processor, :mod:`llava_getok.frames`)."""
    records = getattr(train_dataset, "list_data_dict", None) or []
    if not any(isinstance(r, dict) and isinstance(r.get("getok"), dict) for r in records):
        return
    source = getattr(getattr(train_dataset, "data_args", None), "data_path", "training data")
    try:
        problem = frames_differ(records, frame_of(base), source)
    except ValueError as e:
        problem = f"{source}: {e}"
    if problem:
        raise FormatError(problem)


def prepare_for_getok(model, tokenizer, args, settings: GETokSettings, train_dataset=None) -> GETokState:
    """Choose the location format (``settings.location_format`` with the data's), add its tokens, resize and
    initialise the rows, choose what trains, check the data."""
    if train_dataset is not None and len(train_dataset) == 0:
        source = getattr(getattr(train_dataset, "data_args", None), "data_path", "the training data")
        raise TrainingDataError(f"{source}: no records to train on (a conversion that skipped every record writes an "
                                f"empty file: its .rejects.jsonl says why)")
    try:
        have = data_formats(getattr(train_dataset, "list_data_dict", None))
    except ValueError as e:
        raise FormatError(f"training data: {e}") from None
    cfg = settings.location_format(have)
    if format_name(cfg) not in FORMAT_NAMES:  # qwen25: pixels of Qwen2.5-VL's smart_resized image, which LLaVA never sees
        raise FormatError(f"the training data is in {describe(cfg)}, which LLaVA does not train on")
    base = unwrap_llava(model)
    check_data_frame(base, train_dataset)
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
    mode = rows_mode(settings, args, embeddings_frozen)
    if settings.rows == "factored":
        if not isinstance(cfg, GETokConfig):
            raise ValueError(f"--getok_rows factored factors the grid rows of GETok; the {format_name(cfg)} format has "
                             f"none")
        if mode == "full" and getattr(args, "weight_decay", 0.0):
            raise ValueError("--getok_rows factored with full fine-tuning needs --weight_decay 0: the GETok rows of "
                             "the matrices get no gradient (their deltas train them), but AdamW would still decay "
                             "them")
        attach_trainable_rows(base, ids, grid=cfg.grid, freeze_matrices=mode == "delta")
        mode = f"factored ({'matrices frozen' if mode == 'delta' else 'other rows train'})"
    elif mode == "delta":
        if ids:  # text adds no rows: only LLaVA's own parameters (LoRA, projector) train
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
    if getattr(args, "deepspeed", None):
        match_deepspeed_dtype(model, args)
    if train_dataset is not None and settings.check_data != 0 and hasattr(train_dataset, "list_data_dict"):
        from .check import check_records, raise_on_problems

        data_args = train_dataset.data_args
        source = getattr(data_args, "data_path", "training data")
        report = check_records(train_dataset.list_data_dict, tokenizer, version=None,
                               mm_use_im_start_end=getattr(data_args, "mm_use_im_start_end", False),
                               limit=settings.check_data, source=source)
        raise_on_problems(report, source)
    table = (TokenTable.from_ids(cfg, ids) if isinstance(cfg, GETokConfig)
             else BinsTable.from_ids(cfg, ids) if isinstance(cfg, BinsFormat) else None)
    return GETokState(cfg, ids, table, mode, len(new), size)
