"""peft's trainable tokens (the GETok rows beside LoRA) without a copy of the whole matrix in every forward.

peft's ``TrainableTokensLayer.forward_adapters`` writes the trained rows into a copy of the matrix
(``W.index_copy(0, idx, delta)``) and embeds with, or multiplies by, that copy; its backward then forms the full
(rows x width) weight gradient before the delta keeps its rows. At Qwen2.5-VL-7B's 152,707 x 3584 that is 2 GiB per
copy (bench/results/real_shapes_qwen.md). :class:`LightForward` computes the same values from the frozen matrix and
the delta alone:

- embedding: ``F.embedding(x, W)``, then the positions whose id is a trained token take that token's delta row
  (``torch.where``; the gradient goes to the delta only), times the layer's ``embed_scale`` as peft applies it;
- linear (an LM head, or the tied head peft wraps with the embedding's delta): ``F.linear(x, W)``, then the trained
  rows' columns replaced by ``F.linear(x, delta)`` (``index_copy`` of the logits, not of the matrix); no bias, as peft.

Every case it does not cover (adapters disabled or merged, several active adapters, a trainable base matrix, a head
with a bias, embedding options that change the gradient, a quantized layer, extra arguments) goes to peft's own
forward. :func:`install` puts it on every trainable-token layer of a model as that model's patch
(``llava_getok.patching.model_patches``); :func:`remove` takes it off. The parameters are peft's own: saving, merging
and loading do not change.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..patching import model_patches

WHY = ("peft's trainable tokens copy the whole embedding / LM head matrix in every forward and form its full "
       "gradient in the backward; the same values and delta gradients from the frozen matrix and the delta rows")
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _adapter(layer, active_adapters, args, kwargs) -> str | None:
    """The one adapter whose rows :class:`LightForward` can apply to ``layer``, or None (peft's forward then)."""
    if args or kwargs or layer.disable_adapters or layer.merged or len(active_adapters) != 1:
        return None
    adapter = active_adapters[0]
    if adapter not in layer.trainable_tokens_delta or adapter not in layer.token_indices:
        return None
    base = layer.get_base_layer()
    weight = getattr(base, "weight", None)
    indices = layer.token_indices[adapter]
    if (not isinstance(weight, torch.Tensor) or weight.requires_grad or weight.dtype not in _FLOATS
            or len(set(indices)) != len(indices) or not indices):
        return None
    if isinstance(base, nn.Embedding):
        plain = base.max_norm is None and not base.sparse and not base.scale_grad_by_freq
        return adapter if plain and base.padding_idx not in indices else None
    if isinstance(base, nn.Linear):
        return adapter if base.bias is None else None
    return None


class LightForward:
    """``layer.forward_adapters`` for one ``TrainableTokensLayer``: the trained rows applied to the output, not
    written into a copy of the matrix (an object, not a closure, so that the model still pickles and copies)."""

    def __init__(self, layer):
        self.layer = layer

    def __call__(self, x, active_adapters, *args, **kwargs):
        layer = self.layer
        adapter = _adapter(layer, active_adapters, args, kwargs)
        if adapter is None:
            return type(layer).forward_adapters(layer, x, active_adapters, *args, **kwargs)
        base = layer.get_base_layer()
        weight = base.weight
        delta = layer.trainable_tokens_delta[adapter].to(weight)  # peft casts the rows to the matrix the same way
        idx = torch.tensor(layer.token_indices[adapter], device=weight.device)
        if isinstance(base, nn.Embedding):
            out = F.embedding(x, weight, padding_idx=base.padding_idx)
            ids, order = idx.to(x.dtype).sort()
            at = torch.searchsorted(ids, x).clamp_(max=len(ids) - 1)
            trained = (ids[at] == x).unsqueeze(-1)
            out = torch.where(trained, delta[order[at]], out)
            scale = layer._get_embed_scale()
            return out if scale is None else out * scale.to(out.dtype)
        out = F.linear(x, weight)
        rows = F.linear(x, delta)  # autocast casts both products alike
        return out.index_copy(out.dim() - 1, idx, rows.to(out.dtype))


def trainable_token_layers(model) -> list[tuple[str, nn.Module]]:
    """(name, layer) of every peft ``TrainableTokensLayer`` in ``model`` (a tied head's own layer included)."""
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    return [(name, m) for name, m in model.named_modules() if isinstance(m, TrainableTokensLayer)]


def covered(model) -> list[str]:
    """Names of the trainable-token layers of ``model`` whose next forward the light one computes (patched, and in a
    state it covers); the others run peft's own."""
    return [name for name, layer in trainable_token_layers(model)
            if isinstance(layer.__dict__.get("forward_adapters"), LightForward)
            and _adapter(layer, layer.active_adapters, (), {}) is not None]


def install(model) -> list[str]:
    """Give every trainable-token layer of ``model`` the light forward, as patches kept on ``model``; the names of
    the patches made (none for a layer that has it already)."""
    patches, names = model_patches(model), []
    for name, layer in trainable_token_layers(model):
        if isinstance(layer.__dict__.get("forward_adapters"), LightForward):
            continue
        patch = patches.replace(layer, "forward_adapters", LightForward(layer), why=WHY)
        patch.name = f"{name}: {type(layer).__name__}.forward_adapters"
        names.append(patch.name)
    return names


def remove(model) -> list[str]:
    """Take the light forward off ``model``'s layers (peft's own forward again); the names of the patches undone."""
    return model_patches(model).undo(where=lambda p: p.why == WHY)
