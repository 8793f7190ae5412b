"""Before the first step: the location format chosen (the settings' with the data's), its tokens added to the
processor's tokenizer, the embeddings resized and the new rows initialised (``llava_getok.training.tokens``), and
what trains chosen:

- full fine-tuning: the language model (its embeddings and LM head whole) and the projector; the vision tower too with
  ``--getok_train_vision_tower``;
- LoRA / QLoRA: peft's LoRA on the language model's linear layers and, beside it, only the GETok rows of the input
  embeddings and the LM head, as peft's trainable tokens (``LoraConfig(trainable_token_indices=...)``). Their values
  live in the LM head's ``weight`` as peft exposes it (the matrix with the trained rows written in), which is what trl's
  fused LM head reads; a tied model gets one set of rows for both ends (peft ties the head's to the embedding's). The
  forward of both ends is ``llava_getok.hf.light_tokens``'s (a patch kept on the model): the same values without
  peft's copy of the whole matrix in each call.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..formats import BinsFormat, LocationFormat, data_formats, format_name
from ..training.bins_loss import BinsTable
from ..training.box_loss import TokenTable
from ..training.settings import FormatError, GETokSettings
from ..training.tokens import add_getok_tokens, check_token_ids, init_getok_rows, resize_embeddings
from ..vocab import GETokConfig
from . import light_tokens
from .family import Family


@dataclass
class GETokState:
    """What :func:`add_location_tokens` set up. ``ids``: the format's token ids (none for text); ``table``: what its
    loss indexes (None for text); ``new_rows``: how many of them were added (0 when the tokenizer had them);
    ``vocab_size``: rows of the matrices now."""

    format: LocationFormat
    ids: list[int]
    table: TokenTable | BinsTable | None
    new_rows: int
    vocab_size: int


def tied(model) -> bool:
    """Whether the input embeddings and the LM head share one matrix (Qwen2.5-VL-3B does)."""
    head = model.get_output_embeddings()
    return head is not None and head.weight is model.get_input_embeddings().weight


def add_location_tokens(model, tokenizer, settings: GETokSettings, records) -> GETokState:
    """Choose the format (``settings.location_format`` with the records'), add its tokens, resize the matrices to
    hold them and initialise their rows from the rows of the tokenizer's old tokens (a checkpoint's spare rows, such as
    Qwen2.5-VL-7B's 399, are not old tokens: they never trained)."""
    try:
        cfg = settings.location_format(data_formats(records))
    except ValueError as e:
        raise FormatError(f"training data: {e}") from None
    before = len(tokenizer)
    ids = add_getok_tokens(tokenizer, cfg)
    check_token_ids(tokenizer, cfg)
    rows = model.get_input_embeddings().weight.shape[0]
    resize_embeddings(model, max(len(tokenizer), rows))
    new = [i for i in ids if i >= before]
    if new and len(new) != len(ids):
        raise ValueError(f"{len(ids) - len(new)} location tokens were in the tokenizer already and {len(new)} were "
                         f"not: the tokenizer holds part of another format's tokens")
    if new:
        init_getok_rows(model, ids, cfg, settings.init, n_old=before)
    table = (TokenTable.from_ids(cfg, ids) if isinstance(cfg, GETokConfig)
             else BinsTable.from_ids(cfg, ids) if isinstance(cfg, BinsFormat) else None)
    return GETokState(cfg, ids, table, len(new), model.get_input_embeddings().weight.shape[0])


def check_rows_mode(settings: GETokSettings, lora: bool) -> str:
    """``auto`` (or the mode it means here): full rows under full fine-tuning, the GETok rows alone beside LoRA."""
    mode = "delta" if lora else "full"
    if settings.rows not in ("auto", mode):
        raise ValueError(f"--getok_rows {settings.rows}: this backend trains the whole matrices under full fine-tuning "
                         f"and the GETok rows alone beside LoRA (--getok_rows auto)")
    if settings.train_vision_tower and lora:
        raise ValueError("--getok_train_vision_tower goes with full fine-tuning: a LoRA checkpoint holds the adapter "
                         "and the GETok rows only")
    return mode


def set_full_trainable(model, family: Family, settings: GETokSettings) -> None:
    """Full fine-tuning: everything trains but the vision tower (its projector does), unless the tower is asked for."""
    model.requires_grad_(True)
    if not settings.train_vision_tower:
        model.get_submodule(family.vision).requires_grad_(False)
        model.get_submodule(family.projector).requires_grad_(True)


@dataclass(frozen=True)
class LoraSettings:
    r: int = 64
    alpha: int = 128
    dropout: float = 0.05
    target_modules: str | None = None  # a regex over module names; None: the family's language-model linears


def lora_model(model, family: Family, state: GETokState, lora: LoraSettings, quantized: bool, zero3: bool,
               gradient_checkpointing: bool = True):
    """The model wrapped by peft: LoRA on the language model and the GETok rows as trainable tokens."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if zero3 and state.ids:
        raise ValueError("LoRA with GETok rows under DeepSpeed ZeRO-3 is not supported: peft gathers trainable-token "
                         "rows on CUDA only, and trl's fused LM head cannot gather the head peft builds from them; "
                         "use ZeRO-2 (or full fine-tuning under ZeRO-3)")
    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    tokens = None
    if state.ids:
        # untied: both ends by name (peft >= 0.18); tied: the embedding's rows, which peft ties into the head
        tokens = {"embed_tokens": list(state.ids)} if tied(model) else {"embed_tokens": list(state.ids),
                                                                          "lm_head": list(state.ids)}
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=lora.target_modules or family.lora_targets, trainable_token_indices=tokens,
                        task_type="CAUSAL_LM")
    # ZeRO-3 wants one dtype among what trains (trl passes the same for the models it wraps itself)
    peft_model = get_peft_model(model, config, autocast_adapter_dtype=not (zero3 and not quantized))
    expose_head_bias(peft_model.get_base_model())
    light_tokens.install(peft_model.get_base_model())  # the rows applied without copying the 152k-row matrices
    return peft_model


def expose_head_bias(model) -> None:
    """trl's fused LM head reads ``lm_head.weight`` and ``lm_head.bias``; peft's trainable-token wrapper around the
    head answers ``weight`` (the matrix with the trained rows written in) but has no ``bias`` (AttributeError in the
    first training step). Give the wrapper its head's bias (None for both families' heads)."""
    head = model.get_output_embeddings()
    inner = getattr(head, "original_module", None)
    if inner is None or "bias" in vars(head):
        return
    if inner.bias is not None:
        raise ValueError(f"the LM head {type(inner).__name__} has a bias: trl's fused head would read it beside "
                         "peft's trainable GETok rows, which this backend does not support")
    head.bias = None


def float32_rows(peft_model) -> None:
    """Keep the trainable GETok rows in float32 (trl casts every trainable parameter of a quantized model to bf16,
    where an update ~300 times smaller than a row rounds away); peft casts them to the matrix's dtype in the forward."""
    for name, p in peft_model.named_parameters():
        if p.requires_grad and "trainable_tokens_delta" in name and p.dtype != torch.float32:
            p.data = p.data.float()


def describe_state(state: GETokState, mode: str, settings: GETokSettings) -> str:
    f = state.format
    what = (f"grid {f.grid}, rounds {f.rounds}, mode {f.mode}" if isinstance(f, GETokConfig)
            else f"location format {format_name(f)}")
    ids = (f"ids {min(state.ids)}-{max(state.ids)}, {state.new_rows} new rows, init {settings.init}" if state.ids
           else "none added")
    loss = (f"loss weights grid {settings.grid_weight} box {settings.box_weight}" if settings.loss_on and state.table
            else "the LM loss alone")
    rows = "the GETok rows beside LoRA" if mode == "delta" else "whole matrices"
    return f"GETok: {what}: {len(state.ids)} tokens ({ids}), vocabulary {state.vocab_size}, trainable: {rows}, {loss}"
