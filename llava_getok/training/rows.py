"""Train only the GETok rows of the input embeddings and the LM head (LoRA, QLoRA, frozen backbone).

Why not peft's ``trainable_token_indices`` or ``modules_to_save``: LLaVA's train() applies LoRA *before* it
resizes the embeddings, and modules_to_save copies the whole matrices (docs/pitfalls.md). Here the matrices stay
frozen and untouched; a small module ``model.getok_rows`` holds a (k, dim) delta for each end, added by
forward hooks at the GETok ids only. So the other rows are bit-identical by construction, the optimiser
state is 2 x k x dim, and the delta is an ordinary parameter of the model (seen by LLaVA's optimiser
groups, DeepSpeed, and LLaVA's ``non_lora_trainables.bin``).

:func:`getok_rows_values` gives the effective rows (base + delta) that every checkpoint stores in
``getok_rows.safetensors``; :func:`fold_rows_into_state` writes them into a full state dict, so a full
checkpoint is an ordinary LLaVA checkpoint.
"""
from __future__ import annotations

import contextlib
import hashlib

import torch
from torch import nn

from ..patching import Patch, Patches

ROWS_ATTR = "getok_rows"


class _RowDelta(nn.Module):
    """A (k, dim) delta for one matrix. Its work runs in its own forward, so that ZeRO-3, which gathers a
    module's parameters around that module's forward, hands it the full delta.

    ``grid`` n > 0 factors the first n*n rows (the grid tokens, row-major: index j*n + i is cell (i, j)): their
    delta is ``columns[i] + rows[j] + delta[j*n + i]``, so what one cell learns about its column and row reaches
    the 2n - 2 cells that share them (``--getok_rows factored``); all three parts start at zero."""

    def __init__(self, k: int, dim: int, dtype, device, grid: int = 0):
        super().__init__()
        self.grid = grid
        self.delta = nn.Parameter(torch.zeros(k, dim, dtype=dtype, device=device))
        if grid:
            self.columns = nn.Parameter(torch.zeros(grid, dim, dtype=dtype, device=device))
            self.rows = nn.Parameter(torch.zeros(grid, dim, dtype=dtype, device=device))

    def value(self) -> torch.Tensor:
        """The (k, dim) delta the matrix gets."""
        if not self.grid:
            return self.delta
        n = self.grid
        shared = (self.rows[:, None, :] + self.columns[None, :, :]).reshape(n * n, -1)
        return torch.cat([self.delta[: n * n] + shared, self.delta[n * n:]])

    @torch.no_grad()
    def assign(self, value: torch.Tensor) -> None:
        """Make :meth:`value` equal ``value`` (the shared parts of a factored delta go to zero)."""
        for p in self.parameters():
            p.zero_()
        self.delta.copy_(value.to(self.delta.device, self.delta.dtype))


class _InputDelta(_RowDelta):
    def forward(self, ids, slot_of, out):
        delta = self.value()
        slot = slot_of[ids]
        hit = (slot >= 0).unsqueeze(-1).to(delta.dtype)
        return out + (delta[slot.clamp_min(0)] * hit).to(out.dtype)


class _OutputDelta(_RowDelta):
    def forward(self, hidden, ids, out):
        extra = hidden.to(self.delta.dtype) @ self.value().t()  # (..., k) logits of the delta rows
        # in place: the head's backward needs its input and weight, not its output; a copy of the full
        # (batch, length, vocabulary) logits would cost more than the rest of this hook
        return out.index_add_(-1, ids, extra.to(out.dtype))


class GETokRows(nn.Module):
    """Deltas for the GETok rows of the input embeddings and the LM head, applied by forward hooks.

    ``enabled`` False (or inside :meth:`disabled`) leaves both matrices' outputs as they are: the model as it
    was before these rows trained (GRPO's reference under LoRA turns the adapters and the deltas off)."""

    def __init__(self, ids: list[int], vocab_size: int, dim: int, dtype=torch.float32, device=None, grid: int = 0):
        super().__init__()
        k = len(ids)
        self.enabled = True
        self.input = _InputDelta(k, dim, dtype, device, grid)
        self.output = _OutputDelta(k, dim, dtype, device, grid)
        self.register_buffer("ids", torch.tensor(ids, dtype=torch.long, device=device), persistent=False)
        lookup = torch.full((vocab_size,), -1, dtype=torch.long, device=device)
        lookup[self.ids] = torch.arange(k, device=device)
        self.register_buffer("lookup", lookup, persistent=False)
        self.patches = Patches()  # what attach_trainable_rows changed on the model: its hooks and this module

    @property
    def input_delta(self) -> nn.Parameter:
        return self.input.delta

    @property
    def output_delta(self) -> nn.Parameter:
        return self.output.delta

    def remove(self, model) -> list[str]:
        """Take the deltas off ``model`` (its hooks and this module): the matrices act alone again; returns what was
        taken off. Write the rows into the matrices first (:func:`set_rows` with :func:`getok_rows_values`) to keep
        what trained."""
        return self.patches.undo()

    @contextlib.contextmanager
    def disabled(self):
        """Within this context the matrices act without the deltas."""
        before, self.enabled = self.enabled, False
        try:
            yield self
        finally:
            self.enabled = before

    def embed_hook(self, module, args, out):
        if self.enabled:
            return self.input(args[0], self.lookup.to(args[0].device), out)

    def head_hook(self, module, args, out):
        if self.enabled:
            return self.output(args[0], self.ids.to(out.device), out)


def attach_trainable_rows(model, ids: list[int], grid: int = 0, freeze_matrices: bool = True) -> GETokRows:
    """Add trainable GETok-row deltas to ``model`` (the unwrapped LLaVA model, not a PeftModel); ``grid`` n > 0
    factors the grid rows (see ``_RowDelta``). With ``freeze_matrices`` both embedding matrices are frozen;
    without, they keep training but their GETok rows get no gradient (the deltas train those rows). Idempotent:
    returns the existing module when present."""
    existing = getattr(model, ROWS_ATTR, None)
    if existing is not None:
        return existing
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    # float32 like peft's adapters (autocast_adapter_dtype) whatever the matrices are: an update of a bf16 delta
    # rounds away once the delta is ~300x the step; the hooks cast the delta's contribution to the output's dtype
    dtype = torch.float64 if emb.weight.dtype == torch.float64 else torch.float32
    rows = GETokRows(ids, emb.weight.shape[0], emb.weight.shape[1], dtype=dtype, device=emb.weight.device,
                     grid=grid)
    model.add_module(ROWS_ATTR, rows)
    why = "GETok rows train as deltas (llava_getok.training.rows)"
    rows.patches.add(Patch(f"{type(model).__name__}.{ROWS_ATTR}", why, lambda: delattr(model, ROWS_ATTR)))
    rows.patches.hook(emb.register_forward_hook(rows.embed_hook), f"{type(emb).__name__}: forward hook", why)
    rows.patches.hook(head.register_forward_hook(rows.head_hook), f"{type(head).__name__}: forward hook", why)
    for name, matrix in (("input embeddings", emb.weight), ("LM head", head.weight)):
        if freeze_matrices:
            matrix.requires_grad_(False)
        else:  # the deltas train the GETok rows; the matrix's own gradient there is dropped
            index = rows.ids.to(matrix.device)
            rows.patches.hook(matrix.register_hook(lambda grad, index=index: grad.index_fill(0, index, 0)),
                              f"{name} weight: gradient hook", why)
    return rows


def getok_rows_values(model, ids: list[int]) -> dict[str, torch.Tensor]:
    """Effective GETok rows {"input_rows", "output_rows", "token_ids"} on CPU, float32 (ZeRO-3 aware)."""
    from .tokens import _gathered

    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    rows = getattr(model, ROWS_ATTR, None)
    params = [emb, head] + (list(rows.parameters()) if rows is not None else [])
    index = torch.tensor(ids, dtype=torch.long)
    with _gathered(params), torch.no_grad():
        inp = emb.detach()[index.to(emb.device)].float().cpu()
        out = head.detach()[index.to(head.device)].float().cpu()
        if rows is not None:
            inp = inp + rows.input.value().float().cpu()
            out = out + rows.output.value().float().cpu()
    return {"input_rows": inp.contiguous(), "output_rows": out.contiguous(), "token_ids": index}


def set_rows(model, values: dict[str, torch.Tensor]) -> None:
    """Write saved GETok rows into the model's matrices (zeroing any delta module)."""
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    index = values["token_ids"].long()
    with torch.no_grad():
        emb[index.to(emb.device)] = values["input_rows"].to(emb.device, emb.dtype)
        head[index.to(head.device)] = values["output_rows"].to(head.device, head.dtype)
        rows = getattr(model, ROWS_ATTR, None)
        if rows is not None:
            for part in (rows.input, rows.output):
                part.assign(torch.zeros_like(part.delta))


def fold_rows_into_state(state: dict, values: dict[str, torch.Tensor]) -> dict:
    """A full state dict with the delta keys removed and the effective rows written into the matrices."""
    state = {k: v for k, v in state.items() if f"{ROWS_ATTR}." not in k}
    index = values["token_ids"].long()
    for key, part in (("embed_tokens.weight", "input_rows"), ("lm_head.weight", "output_rows")):
        names = [k for k in state if k.endswith(key)]
        if len(names) != 1:
            raise KeyError(f"expected one '{key}' in the state dict, found {names}")
        w = state[names[0]].clone()
        w[index] = values[part].to(w.dtype)
        state[names[0]] = w
    return state


def check_same_on_all_ranks(rows: dict[str, torch.Tensor], folder) -> int:
    """Raise unless every process holds the same GETok rows (bit for bit); return the number of processes.

    Data parallel and ZeRO keep one model: ranks that disagree trained or initialised the rows apart (the
    pitfall of resizing or initialising outside ZeRO-3's gathered parameters), and the checkpoint would hold
    rank 0's rows only."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return 1
    digest = hashlib.sha256()
    for key in sorted(rows):
        digest.update(rows[key].contiguous().numpy().tobytes())
    digests = [None] * dist.get_world_size()
    dist.all_gather_object(digests, digest.hexdigest())
    differ = [rank for rank, d in enumerate(digests) if d != digests[0]]
    if differ:
        raise RuntimeError(f"GETok rows differ between ranks when saving {folder}: ranks {differ} disagree with "
                           f"rank 0; the processes trained or initialised the rows apart")
    return len(digests)


@contextlib.contextmanager
def saving_adapter_only(peft_model):
    """Within this block ``peft_model.save_pretrained`` writes the adapter without the embedding matrices: peft's
    default ``save_embedding_layers="auto"`` sees the resized vocabulary and would write both full matrices into every
    checkpoint, while the GETok rows are saved in ``getok_rows.safetensors`` (and, as trainable tokens, in the
    adapter). A patch of the instance for the block only."""
    import functools

    with Patches().applied() as patches:
        patches.replace(peft_model, "save_pretrained", functools.partial(
            type(peft_model).save_pretrained, peft_model, save_embedding_layers=False),
            why="no full embedding matrices in the adapter, for this save")
        yield peft_model
