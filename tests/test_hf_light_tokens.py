"""``llava_getok.hf.light_tokens``: peft's trainable tokens (the GETok rows beside LoRA) applied to the outputs of the
frozen matrices instead of a copy of them, with the same logits and the same row gradients as peft's own forward
(tiny Qwen2.5-VL untied and tied, tiny llava-hf; float32 and bf16 autocast), the same training losses, and a patch
that lists and removes itself."""
import pytest
import torch
from hf_helpers import train_argv

from llava_getok.hf import light_tokens
from llava_getok.patching import model_patches


def lora_with_rows(model_dir, seed=0):
    """The tiny model grown by 4 rows, wrapped by ``lora_model`` with 6 trained rows (4 new, 2 old, not contiguous),
    their deltas moved off their initial values (peft starts them at the matrix's rows)."""
    from llava_getok.hf.family import family_of
    from llava_getok.hf.prepare import GETokState, LoraSettings, lora_model

    torch.manual_seed(seed)
    family = family_of(model_dir)
    model = family.load_class().from_pretrained(str(model_dir), dtype=torch.float32)
    n = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(n + 4)
    ids = [3, 17, n, n + 1, n + 2, n + 3]
    state = GETokState(format=None, ids=ids, table=None, new_rows=4, vocab_size=n + 4)
    peft_model = lora_model(model, family, state, LoraSettings(r=4, alpha=8, dropout=0.0), quantized=False,
                            zero3=False, gradient_checkpointing=False)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "trainable_tokens_delta" in name:
                p.add_(torch.randn_like(p) * 0.5)
    return peft_model, ids


def deltas(peft_model):
    return {name: p for name, p in peft_model.named_parameters() if "trainable_tokens_delta" in name}


def step(peft_model, input_ids, bf16):
    """Logits of one forward and the row deltas' gradients of a fixed function of them."""
    peft_model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = peft_model(input_ids=input_ids).logits.float()
    weights = torch.linspace(-1, 1, logits.numel()).reshape(logits.shape)
    (logits * weights).sum().backward()
    return logits.detach(), {name: p.grad.clone() for name, p in deltas(peft_model).items()}


@pytest.mark.parametrize("which", ["tiny_qwen_dir", "tiny_qwen_tied_dir", "tiny_llava_hf_dir"])
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_same_logits_and_row_gradients_as_peft(which, bf16, request):
    peft_model, ids = lora_with_rows(request.getfixturevalue(which))
    base = peft_model.get_base_model()
    layers = light_tokens.trainable_token_layers(base)
    names = model_patches(base).names()
    assert len(names) == len(layers) == 2 and all("forward_adapters" in n for n in names), names
    assert light_tokens.covered(base) == [name for name, _ in layers]
    assert len(deltas(peft_model)) == (1 if which == "tiny_qwen_tied_dir" else 2)  # tied: one delta, both ends
    input_ids = torch.tensor([[ids[0], 5, ids[2], 9, ids[5], ids[2], 1, ids[1]], [ids[3], 2, 4, ids[4], 6, 7, 8, 11]])
    light, light_grads = step(peft_model, input_ids, bf16)
    assert light_tokens.remove(base) == names and not model_patches(base).names() and not light_tokens.covered(base)
    assert all("forward_adapters" not in vars(layer) for _, layer in layers)  # peft's own method again
    own, own_grads = step(peft_model, input_ids, bf16)
    assert own_grads.keys() == light_grads.keys()
    for got, want in [(light, own)] + [(light_grads[name], own_grads[name]) for name in own_grads]:
        assert want.abs().sum() > 0
        if bf16:  # bf16 products summed in another order (the head's input gradient): within bf16's rounding
            assert (got - want).norm() <= 1e-2 * want.norm()
        else:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # installed again: the disabled adapter falls back to peft's forward (the base model's logits)
    assert light_tokens.install(base) == names and light_tokens.install(base) == []
    with torch.no_grad(), peft_model.disable_adapter():
        assert not light_tokens.covered(base)
        off = peft_model(input_ids=input_ids).logits
        light_tokens.remove(base)
        torch.testing.assert_close(off, peft_model(input_ids=input_ids).logits, rtol=0, atol=0)


def test_head_alone_same_values_and_gradients_under_bf16(tiny_llava_hf_dir):
    """The LM head on hidden states (as the trainer's ``step_loss`` calls it): outputs, row and input gradients."""
    peft_model, ids = lora_with_rows(tiny_llava_hf_dir, seed=1)
    base = peft_model.get_base_model()
    head = base.get_output_embeddings()
    hidden = torch.randn(5, head.token_adapter.in_features)
    results = []
    for light in (True, False):
        (light_tokens.install if light else light_tokens.remove)(base)
        x = hidden.clone().requires_grad_(True)
        peft_model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = head(x)
        (out.float() * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        delta = head.token_adapter.trainable_tokens_delta["default"]
        results.append((out.dtype, out.float().detach(), x.grad, delta.grad))
    (dtype, out, gx, gd), (own_dtype, own, own_gx, own_gd) = results
    assert dtype == own_dtype == torch.bfloat16
    torch.testing.assert_close(out, own, rtol=0, atol=0)  # the same bf16 products
    torch.testing.assert_close(gx, own_gx, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(gd, own_gd, rtol=2e-2, atol=2e-2)


def test_lora_training_losses_unchanged(tiny_qwen_tied_dir, hf_grounding, tmp_path):
    """Three LoRA steps of the entry point's trainer with the light forward and with peft's own: the same losses."""
    from llava_getok.hf.train import build
    from llava_getok.hf.trainer import unwrap

    runs = []
    for light in (True, False):
        argv = train_argv(tiny_qwen_tied_dir, hf_grounding["orig"], tmp_path / f"out-{light}", "--lora_enable", "True",
                          "--lora_r", "8", "--lora_alpha", "16", "--save_strategy", "no", steps=3)
        trainer = build(argv + ["--use_cpu", "True", "--bf16", "False"])
        assert len(light_tokens.covered(unwrap(trainer.model))) == 2  # embedding and (tied) head
        if not light:
            light_tokens.remove(unwrap(trainer.model))
        trainer.train()
        runs.append([h["loss"] for h in trainer.state.log_history if "loss" in h])
    assert len(runs[0]) == 3
    assert runs[0] == pytest.approx(runs[1], rel=1e-4), runs


def test_a_copied_model_keeps_its_own_light_forward(tiny_llava_hf_dir):
    """trl copies a model for GRPO's reference (``copy.deepcopy``); the copy's layers run their own rows."""
    import copy
    import pickle

    peft_model, ids = lora_with_rows(tiny_llava_hf_dir, seed=2)
    twin = copy.deepcopy(peft_model)
    pickled = pickle.loads(pickle.dumps(peft_model))
    for other in (twin, pickled):
        layers = light_tokens.trainable_token_layers(other.get_base_model())
        assert all(vars(layer)["forward_adapters"].layer is layer for _, layer in layers)
        assert len(model_patches(other.get_base_model()).names()) == 2
    with torch.no_grad():
        for name, p in deltas(twin).items():
            p.zero_()
        input_ids = torch.tensor([[ids[2], 5, ids[0]]])
        mine, theirs = peft_model(input_ids=input_ids).logits, twin(input_ids=input_ids).logits
        assert not torch.allclose(mine, theirs)
        torch.testing.assert_close(mine, pickled(input_ids=input_ids).logits, rtol=0, atol=0)
