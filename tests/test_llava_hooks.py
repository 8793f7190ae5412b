"""The LLaVA hooks on the tiny LLaVA: register(), compat fixes, tokens and rows, templates, loss parity with
plain LLaVA, check-data, and the builder's refusals."""
import copy
import json
import shutil

import pytest
import torch

import llava_getok as gt
from llava_getok.vocab import GETokConfig

CFG = GETokConfig(grid=8)


@pytest.fixture(scope="module")
def registered():
    return gt.register()


@pytest.fixture(scope="module")
def data(tmp_path_factory, shared_data):
    from llava_getok.llava.tiny import make_grounding_data

    return make_grounding_data(tmp_path_factory.mktemp("rec-hooks"), shared_data / "coco_mini", CFG, n_records=2)


def llava_train_args(out, **kw):
    from llava.train.train import TrainingArguments

    return TrainingArguments(output_dir=str(out), report_to="none", use_cpu=True, per_device_train_batch_size=2,
                             **kw)


@pytest.fixture(scope="module")
def getok_setup(registered, tiny_llava_dir, data, tmp_path_factory):
    """The tiny LLaVA as LLaVA's train() hands it to the trainer, data module and a GETok trainer on it."""
    from llava import conversation
    from llava.model import LlavaLlamaForCausalLM
    from transformers import AutoTokenizer

    from llava_getok.training.settings import GETokSettings
    from llava_getok.llava.tiny import supervised_data_module
    from llava_getok.llava.trainer import GETokTrainer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llava_dir, use_fast=False, model_max_length=256, padding_side="right")
    tokenizer.pad_token = tokenizer.unk_token
    model = LlavaLlamaForCausalLM.from_pretrained(tiny_llava_dir)
    model.get_model().get_vision_tower().load_model()
    model.config.use_cache = False
    saved = conversation.default_conversation
    module = supervised_data_module(tokenizer, model, data)
    trainer = GETokTrainer(model=model, tokenizer=tokenizer, args=llava_train_args(tmp_path_factory.mktemp("t")),
                           settings=GETokSettings(grid=8, grid_weight=0.5, box_weight=0.5), **module)
    batch = module["data_collator"]([module["train_dataset"][0], module["train_dataset"][1]])
    yield trainer, batch, module
    conversation.default_conversation = saved


# -- register / compat ------------------------------------------------------------------------------------

def test_compat_forward_accepts_cache_position_and_text_only_generate_works(registered, tiny_llava_dir):
    import inspect

    from llava.model.builder import load_pretrained_model

    tokenizer, model, processor, _ = load_pretrained_model(str(tiny_llava_dir), None, "tiny-llava", device="cpu")
    assert "cache_position" in inspect.signature(type(model).forward).parameters
    assert model.dtype == torch.float32  # LLaVA's builder would give float16 on CPU
    ids = torch.tensor([[1, 5, 6, 7]])
    out = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False)  # fix 7
    assert out.shape == (1, 3)
    # with images and the KV cache, generate equals an uncached greedy loop (fix 1 keeps attention_mask)
    images = torch.zeros(1, 3, 32, 32)
    img_ids = torch.tensor([[1, 5, -200, 6, 7]])
    cached = model.generate(img_ids, images=images, max_new_tokens=3, do_sample=False)[0].tolist()
    seq = img_ids
    with torch.no_grad():
        for _ in range(3):
            nxt = model(input_ids=seq, images=images).logits[0, -1].argmax()
            seq = torch.cat([seq, nxt.view(1, 1)], 1)
    assert cached == seq[0, -3:].tolist()


# -- tokens, rows, templates ------------------------------------------------------------------------------

def test_getok_tokens_are_one_id_everywhere_and_legacy_tokenizers_are_refused(tiny_tokenizer_dir):
    from transformers import AutoTokenizer

    from llava_getok.training.tokens import add_getok_tokens, check_token_ids

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir, use_fast=False)
    ids = add_getok_tokens(tok, CFG)
    assert len(set(ids)) == len(CFG.tokens()) and add_getok_tokens(tok, CFG) == ids  # idempotent
    check_token_ids(tok, CFG, tokens=list(CFG.tokens()))
    text = "USER: <image>\nWhere? ASSISTANT: <box><grid_1_2><off_0_1><grid_7_7><off_-1_0></box>"
    pieces = tok.convert_ids_to_tokens(tok(text).input_ids)
    assert pieces[-7:] == ["\u2581", "<box>", "<grid_1_2>", "<off_0_1>", "<grid_7_7>", "<off_-1_0>", "</box>"]
    # decoding needs spaces_between_special_tokens=False (the slow tokenizer's default inserts spaces)
    assert tok.decode(tok(text, add_special_tokens=False).input_ids, spaces_between_special_tokens=False) == text
    legacy = AutoTokenizer.from_pretrained(tiny_tokenizer_dir, use_fast=False, legacy=True)
    # the tokens added as plain special tokens, without add_getok_tokens' switch to legacy=False
    # (tests/test_legacy_tokenizer.py: the switch, on the real 32,000-piece LLaMA vocabulary)
    legacy.add_special_tokens({"additional_special_tokens": list(CFG.tokens())}, replace_additional_special_tokens=False)
    with pytest.raises(ValueError, match="legacy=False"):
        check_token_ids(legacy, CFG)


def test_row_init_mean_and_sincos2d(registered, tiny_llava_dir):
    from llava.model import LlavaLlamaForCausalLM

    from llava_getok.training.tokens import init_getok_rows, resize_embeddings

    model = LlavaLlamaForCausalLM.from_pretrained(tiny_llava_dir)
    n_old = model.get_input_embeddings().weight.shape[0]
    before = model.get_input_embeddings().weight.detach().clone()
    k = len(CFG.tokens())
    assert resize_embeddings(model, n_old + k) == n_old and model.config.vocab_size == n_old + k
    ids = list(range(n_old, n_old + k))
    init_getok_rows(model, ids, CFG, "mean")
    w = model.get_input_embeddings().weight.detach()
    assert torch.equal(w[:n_old], before)
    assert torch.allclose(w[n_old], before.mean(0), atol=1e-6) and torch.equal(w[n_old], w[-1])
    init_getok_rows(model, ids, CFG, "sincos2d")
    w = model.get_input_embeddings().weight.detach()
    head = model.get_output_embeddings().weight.detach()
    cell = lambda i, j: w[n_old + j * CFG.grid + i] - before.mean(0)
    cos = torch.nn.functional.cosine_similarity
    assert cos(cell(3, 3), cell(4, 3), dim=0) > cos(cell(3, 3), cell(7, 0), dim=0)
    assert not torch.allclose(head[n_old], head[n_old + 1])  # the LM head is initialised too
    with pytest.raises(ValueError, match="shrink"):
        resize_embeddings(model, n_old)


def test_the_location_format_comes_from_the_data_or_must_agree_with_it():
    from llava_getok.formats import BinsFormat, TextFormat
    from llava_getok.training.settings import FormatError, GETokSettings

    assert GETokSettings(grid=8).location_format([]) == CFG.with_mode("inline")  # no data format: GETok, the flags'
    assert GETokSettings(grid=8).location_format([GETokConfig(grid=8, mode="refine"), GETokConfig(grid=8)]) == GETokConfig(grid=8)
    assert GETokSettings().location_format([BinsFormat(64)]) == BinsFormat(64)  # the data's format and K
    assert GETokSettings(format="bins").location_format([]) == BinsFormat(1000)
    assert GETokSettings().location_format([TextFormat(3)]) == TextFormat(3)
    for settings, data, message in [
            (GETokSettings(), [GETokConfig(grid=8)], "are not the training data's"),  # the default grid 32 on grid-8 data
            (GETokSettings(format="getok"), [BinsFormat(64)], "--getok_format getok, but the training data is in bins"),
            (GETokSettings(bins=100), [BinsFormat(64)], "--getok_bins 100, but the training data is in bins, K = 64"),
            (GETokSettings(), [BinsFormat(64), TextFormat()], "mixes location formats")]:
        with pytest.raises(FormatError, match=message):
            settings.location_format(data)


def test_bin_rows_get_the_mean_plus_a_1d_code_of_the_bin_centre():
    from llava_getok.formats import BinsFormat
    from llava_getok.training.tokens import getok_row_targets

    fmt, mean = BinsFormat(bins=50), torch.randn(64)
    rows = getok_row_targets(fmt, "sincos2d", mean, spread=0.5)
    assert rows.shape == (50, 64) and torch.equal(getok_row_targets(fmt, "mean", mean, 0.5), mean.expand(50, 64))
    code = rows - mean
    dist = lambda a, b: float((code[a] - code[b]).norm())  # noqa: E731
    assert dist(20, 21) < dist(20, 25) < dist(20, 45)  # near bins start near each other, far bins far
    assert float(code.pow(2).mean(1).sqrt().mean()) == pytest.approx(0.5, rel=1e-4)  # the spread of the old rows


def test_trainable_rows_change_only_getok_rows_even_with_weight_decay(registered, tiny_llava_dir):
    from llava.model import LlavaLlamaForCausalLM

    from llava_getok.training.rows import attach_trainable_rows, getok_rows_values
    from llava_getok.training.tokens import init_getok_rows, resize_embeddings

    model = LlavaLlamaForCausalLM.from_pretrained(tiny_llava_dir)
    n_old = model.get_input_embeddings().weight.shape[0]
    ids = list(range(n_old, n_old + len(CFG.tokens())))
    resize_embeddings(model, ids[-1] + 1)
    init_getok_rows(model, ids, CFG)
    model.requires_grad_(False)
    rows = attach_trainable_rows(model, ids)
    emb0 = model.get_input_embeddings().weight.detach().clone()
    head0 = model.get_output_embeddings().weight.detach().clone()
    start = getok_rows_values(model, ids)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    x = torch.tensor([[1, ids[3], 7, ids[10], ids[0]]])
    for _ in range(2):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["getok_rows.input.delta",
                                                                          "getok_rows.output.delta"]
    assert torch.equal(model.get_input_embeddings().weight, emb0) and torch.equal(model.get_output_embeddings().weight, head0)
    end = getok_rows_values(model, ids)
    assert not torch.equal(end["input_rows"][3], start["input_rows"][3])
    assert rows.input_delta.shape == (len(ids), emb0.shape[1])


def test_factored_grid_rows_share_what_one_cell_learns_and_leave_the_matrix_rows_alone(registered, tiny_llava_dir):
    """--getok_rows factored: a grid row's delta is its column part + its row part + its own residual. A step on one
    cell moves the cells of its column and row (not the others); the other rows of the matrices keep training
    while their GETok rows get no gradient; the effective rows save, restore and fold like plain deltas."""
    from llava.model import LlavaLlamaForCausalLM

    from llava_getok.training.rows import attach_trainable_rows, fold_rows_into_state, getok_rows_values, set_rows
    from llava_getok.training.tokens import init_getok_rows, resize_embeddings

    model = LlavaLlamaForCausalLM.from_pretrained(tiny_llava_dir)
    n_old = model.get_input_embeddings().weight.shape[0]
    ids = list(range(n_old, n_old + len(CFG.tokens())))
    resize_embeddings(model, ids[-1] + 1)
    init_getok_rows(model, ids, CFG)
    rows = attach_trainable_rows(model, ids, grid=CFG.grid, freeze_matrices=False)
    emb0 = model.get_input_embeddings().weight.detach().clone()
    start = getok_rows_values(model, ids)
    n = CFG.grid
    cell = CFG.grid_tokens.index(CFG.grid_token(2, 5))  # column i = 2, row j = 5
    x = torch.tensor([[1, ids[cell], 7]])
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(input_ids=x, labels=x).loss.backward()
    opt.step()
    moved = (getok_rows_values(model, ids)["input_rows"] - start["input_rows"]).abs().sum(1)[: n * n].view(n, n)
    shares = torch.zeros(n, n, dtype=torch.bool)
    shares[5, :] = shares[:, 2] = True  # [j, i]: the row and the column of the cell
    assert (moved[shares] > 0).all() and (moved[~shares] == 0).all()
    emb = model.get_input_embeddings().weight.detach()
    assert torch.equal(emb[ids], emb0[ids]) and not torch.equal(emb[:n_old], emb0[:n_old])  # text rows trained
    assert {k for k, _ in rows.named_parameters()} >= {"input.columns", "input.rows", "input.delta"}
    # the effective rows round-trip: fold into a full state, or write into the matrices (deltas then zero)
    values = getok_rows_values(model, ids)
    state = fold_rows_into_state(model.state_dict(), values)
    assert not any("getok_rows." in k for k in state)
    assert torch.equal(state["model.embed_tokens.weight"][ids], values["input_rows"])
    set_rows(model, values)
    assert torch.allclose(getok_rows_values(model, ids)["input_rows"], values["input_rows"], atol=1e-6)
    assert all(float(p.abs().sum()) == 0 for p in rows.parameters())


def test_templates_keep_llavas_preprocessing_and_unknown_versions_fail(registered):
    from llava import conversation

    from llava_getok.llava.templates import SYSTEM_NOTE, resolve_template

    v1, g = conversation.conv_templates["v1"], conversation.conv_templates["getok_v1"]
    assert g.version == v1.version and g.sep_style == v1.sep_style and g.sep2 == v1.sep2
    assert g.system.endswith(SYSTEM_NOTE) and conversation.conv_templates["getok_plain"].system == ""
    with pytest.raises(ValueError, match="getok_v1"):
        resolve_template("getok_v7")


# -- loss parity with plain LLaVA ---------------------------------------------------------------------

def test_zero_weights_reproduce_plain_llava_loss_bit_for_bit(getok_setup):
    from llava.train.llava_trainer import LLaVATrainer

    from llava_getok.llava.trainer import GETokSettings

    trainer, batch, _ = getok_setup
    plain = LLaVATrainer(model=trainer.model, tokenizer=trainer._getok_tokenizer, args=trainer.args)
    torch.manual_seed(0)
    reference = plain.compute_loss(trainer.model, dict(batch))
    trainer.settings = GETokSettings(grid=8, grid_weight=0.0, box_weight=0.0)
    try:
        assert torch.equal(trainer.compute_loss(trainer.model, dict(batch)), reference)
    finally:
        trainer.settings = GETokSettings(grid=8, grid_weight=0.5, box_weight=0.5)
    total = trainer.compute_loss(trainer.model, dict(batch))
    logged = {k: float(v) for k, v in trainer._getok_sums.items()}  # sums since the last log, as tensors
    assert logged["loss_lm"] == float(reference)  # the LM part is LLaVA's loss, bit for bit
    assert logged["loss_grid"] > 0 and logged["loss_box"] > 0
    assert float(total) == pytest.approx(float(reference) + 0.5 * logged["loss_grid"] + 0.5 * logged["loss_box"],
                                         rel=1e-6)
    trainer._getok_sums = {}


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_trainer_box_loss_on_scored_rows_equals_the_loss_on_full_logits(getok_setup, training):
    """The trainer applies the LM head to the scored positions' hidden states only (in training also for the
    LM loss, on the labelled positions); value and gradients must be those of the loss on the full logits."""
    from llava_getok.training.box_loss import box_token_loss
    from llava_getok.training.loss_parts import Targets

    trainer, batch, _ = getok_setup
    model, s = trainer.model, trainer.settings
    model.train(training)
    params = [p for p in model.parameters() if p.requires_grad]

    def grads(loss):
        model.zero_grad(set_to_none=True)
        loss.backward()
        return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]

    from llava_getok.training.box_loss import TokenTable

    seen, table_loss = [], TokenTable.loss
    with pytest.MonkeyPatch.context() as mp:  # the trainer asks the format's table for its loss
        mp.setattr(TokenTable, "loss", lambda self, scores, *a, **k: seen.append(callable(scores)) or table_loss(self, scores, *a, **k))
        total = trainer.compute_loss(model, dict(batch))
    assert seen == [True]  # the scored-rows path ran, not the fallback on full logits
    logged, trainer._getok_sums = {k: float(v) for k, v in trainer._getok_sums.items()}, {}
    lm = total - s.grid_weight * logged["loss_grid"] - s.box_weight * logged["loss_box"]
    via_rows = grads(total)
    captured = {}
    original = model.prepare_inputs_labels_for_multimodal
    try:  # a plain forward, keeping the labels LLaVA builds inside it
        model.prepare_inputs_labels_for_multimodal = lambda *a, **k: captured.setdefault("out", original(*a, **k))
        out = model(**dict(batch))
    finally:
        model.prepare_inputs_labels_for_multimodal = original
    parts = box_token_loss(out.logits, Targets.of(captured["out"][-1]), trainer.getok.table, sigma=s.sigma,
                           offset_sigma=s.offset_sigma)
    assert parts["n_box"] == 2 and float(parts["grid"]) == pytest.approx(logged["loss_grid"], rel=1e-5)
    assert float(parts["box"]) == pytest.approx(logged["loss_box"], rel=1e-5)
    assert float(lm) == pytest.approx(float(out.loss), rel=1e-6)
    via_logits = grads(out.loss + s.grid_weight * parts["grid"] + s.box_weight * parts["box"])
    for a, b in zip(via_rows, via_logits):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    model.zero_grad(set_to_none=True)
    model.eval()


def test_training_runs_the_lm_head_on_labelled_positions_only(getok_setup):
    """In training LLaMA's forward computes no full-length logits: the head sees each sequence's last position,
    then the positions that have a target; the LM loss is LLaVA's own up to float rounding."""
    from llava.train.llava_trainer import LLaVATrainer

    trainer, batch, _ = getok_setup
    model = trainer.model
    reference = LLaVATrainer(model=model, tokenizer=trainer._getok_tokenizer, args=trainer.args).compute_loss(
        model, dict(batch), return_outputs=True)
    rows = []
    handle = model.get_output_embeddings().register_forward_hook(lambda m, a, out: rows.append(tuple(out.shape[:-1])))
    model.train()
    try:
        trainer.compute_loss(model, dict(batch))
    finally:
        model.eval()
        handle.remove()
    logged, trainer._getok_sums = {k: float(v) for k, v in trainer._getok_sums.items()}, {}
    B, T = reference[1].logits.shape[:2]
    labelled = sum(int((row[1:] != -100).sum()) for row in trainer_labels(model, batch))
    assert rows == [(B, 1), (labelled,)] and labelled < B * T / 2
    assert logged["loss_lm"] == pytest.approx(float(reference[0]), rel=1e-6)


def test_a_training_step_leaves_the_model_as_it_was(getok_setup):
    """The loss capture is installed for one forward only: after a step the LLaVA model has no hook of ours on its
    LM head and its own prepare_inputs_labels_for_multimodal again (peft's habit: hooks for the call that needs
    them)."""
    trainer, batch, _ = getok_setup
    model = trainer.model
    head = model.get_output_embeddings()
    before = (dict(head._forward_pre_hooks), dict(head._forward_hooks), "prepare_inputs_labels_for_multimodal" in vars(model))
    for training in (True, False):
        model.train(training)
        trainer.compute_loss(model, dict(batch))
    model.eval()
    trainer._getok_sums = {}
    assert (dict(head._forward_pre_hooks), dict(head._forward_hooks), "prepare_inputs_labels_for_multimodal" in vars(model)) == before


def test_row_deltas_list_their_patches_and_remove_them(registered, tiny_llava_dir):
    """The row deltas patch the model (a module and hooks that every forward needs): they are listed, and remove()
    takes every one off, leaving the model's outputs those of its matrices alone."""
    from llava.model import LlavaLlamaForCausalLM

    from llava_getok.training.rows import ROWS_ATTR, attach_trainable_rows
    from llava_getok.training.tokens import resize_embeddings

    model = LlavaLlamaForCausalLM.from_pretrained(tiny_llava_dir)
    n_old = model.get_input_embeddings().weight.shape[0]
    ids = list(range(n_old, n_old + len(CFG.tokens())))
    resize_embeddings(model, ids[-1] + 1)
    x = torch.tensor([[1, ids[3], 7, ids[10]]])
    plain = model(input_ids=x).logits
    rows = attach_trainable_rows(model, ids, freeze_matrices=False)
    with torch.no_grad():
        rows.output.delta.add_(1.0)
    assert not torch.equal(model(input_ids=x).logits, plain)
    listed = rows.patches.names()
    assert len(listed) == 5 and listed[0].endswith(ROWS_ATTR)  # the module, two forward hooks, two gradient hooks
    assert rows.remove(model) == listed and rows.patches.names() == []
    assert not hasattr(model, ROWS_ATTR) and torch.equal(model(input_ids=x).logits, plain)


def test_unregister_undoes_the_hooks_and_lists_the_compat_fixes_that_stay():
    import llava.model.builder as builder
    import llava.train.train as train_mod
    from llava import conversation

    from llava_getok.llava import unregister
    from llava_getok.llava.trainer import GETokTrainer
    from llava_getok.patching import PROCESS

    gt.register()
    assert getattr(builder.load_pretrained_model, "__getok_hook__", False) and "getok_v1" in conversation.conv_templates
    report = unregister()
    try:
        assert report.builder_hook and report.trainer_hook and "getok_v1" in report.templates
        assert not getattr(builder.load_pretrained_model, "__getok_hook__", False)
        assert not any(name.startswith("getok_") for name in conversation.conv_templates)
        assert not (hasattr(train_mod.LLaVATrainer, "func") and train_mod.LLaVATrainer.func is GETokTrainer)
        assert report.stays and report.stays == PROCESS.names(permanent=True)  # the compat fixes
        assert any("LlavaLlamaForCausalLM.forward" in name for name in report.stays)  # cache_position, for one
    finally:
        gt.register()
    assert getattr(builder.load_pretrained_model, "__getok_hook__", False) and "getok_v1" in conversation.conv_templates


def test_bf16_loss_matches_float32_under_autocast_and_with_bf16_weights(getok_setup):
    """What GPU users run: bf16 autocast (--bf16 True) and bf16 weights without autocast (DeepSpeed's bf16). The
    training loss on a fixed batch stays within 2 % of the float32 loss in both, its parts are float32, and the
    gradients arrive in the weights' dtype, finite."""
    trainer, batch, _ = getok_setup
    model = trainer.model
    keep = {k: v.clone() for k, v in model.state_dict().items()}

    def loss_and_parts(images_dtype=torch.float32):
        trainer._getok_sums = {}  # under DeepSpeed the Trainer casts float inputs to its dtype
        total = trainer.compute_loss(model, {**batch, "images": batch["images"].to(images_dtype)})
        parts, trainer._getok_sums = {k: v for k, v in trainer._getok_sums.items() if k != "_n"}, {}
        return total, parts

    model.train()
    try:
        ref, ref_parts = loss_and_parts()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed, mixed_parts = loss_and_parts()
        model.to(torch.bfloat16)
        half, half_parts = loss_and_parts(torch.bfloat16)
        model.zero_grad(set_to_none=True)
        half.backward()
        grads = [(p.grad.dtype, bool(torch.isfinite(p.grad).all())) for p in model.parameters() if p.grad is not None]
    finally:
        model.to(torch.float32)
        model.load_state_dict(keep)
        model.zero_grad(set_to_none=True)
        model.eval()
    for total, parts in ((mixed, mixed_parts), (half, half_parts)):
        assert total.dtype == torch.float32 and all(v.dtype == torch.float32 for v in parts.values())
        assert float(total) == pytest.approx(float(ref), rel=2e-2)
        for k in ("loss_lm", "loss_grid", "loss_box"):
            assert float(parts[k]) == pytest.approx(float(ref_parts[k]), rel=2e-2, abs=1e-2), k
    assert grads and set(grads) == {(torch.bfloat16, True)}


def trainer_labels(model, batch):
    """The labels LLaVA builds inside its forward (image positions inserted, re-padded)."""
    out = model.prepare_inputs_labels_for_multimodal(batch["input_ids"], None, batch["attention_mask"], None,
                                                     batch["labels"], batch["images"])
    return out[-1]


# -- check-data ---------------------------------------------------------------------------------------

def test_check_data_passes_good_data_and_fails_loudly_on_mismatch_and_split_tokens(getok_setup, data, tmp_path):
    from llava_getok.llava.check import DataCheckError, check_records, main, raise_on_problems

    trainer, _, module = getok_setup
    tokenizer = trainer._getok_tokenizer
    records = json.loads(data.read_text())
    ok = check_records(records, tokenizer, version="getok_v1", source="good")
    assert ok.ok and ok.checked == 2 and ok.getok_tokens == 12
    # a second turn passes (the tiny tokenizer splits "USER" after "</s>" as LLaMA's does) ...
    two_turns = copy.deepcopy(records[0])
    two_turns["conversations"] += [{"from": "human", "value": "And the other one?"},
                                   {"from": "gpt", "value": "<box><grid_1_1><off_0_0><grid_2_2><off_0_0></box>"}]
    assert check_records([two_turns], tokenizer, version="getok_v1", source="two").ok
    # ... but text that holds the template's own separator breaks LLaVA's round arithmetic (LLaVA#661)
    quoting = copy.deepcopy(two_turns)
    quoting["conversations"][2]["value"] = "The caption says ASSISTANT: hello. And the other one?"
    bad = check_records([quoting], tokenizer, version="getok_v1", source="bad")
    assert not bad.ok and "tokenization mismatch" in bad.problems[0] and "record 0" in bad.problems[0]
    with pytest.raises(DataCheckError, match="1 of 1 records"):
        raise_on_problems(bad, "bad.json")
    # a repeated record is checked once; a limit spreads over the file (the first two would miss the bad one)
    mixed = [records[0], records[1], copy.deepcopy(records[0]), quoting]
    full = check_records(mixed, tokenizer, version="getok_v1", source="mixed")
    assert (full.records, full.repeats, full.checked) == (4, 1, 3) and "record 3" in full.problems[0]
    spread = check_records(mixed, tokenizer, version="getok_v1", limit=2, source="mixed")
    assert spread.checked == 2 and "record 3" in spread.problems[0]
    assert check_records(mixed, tokenizer, version="getok_v1", limit=0, source="mixed").checked == 0
    # tokens of another grid are not GETok tokens of this tokenizer: they split
    wrong_grid = copy.deepcopy(records[0])
    wrong_grid["conversations"][1]["value"] = "<box><grid_20_3><off_0_0><grid_21_9><off_0_0></box>"
    split = check_records([wrong_grid], tokenizer, version="getok_v1", source="split")
    assert not split.ok and "2 supervised" in split.problems[0] or "supervised location token" in split.problems[0]
    # the CLI: exit status 0 / 1 and a table
    ckpt = tmp_path / "tok"
    tokenizer.save_pretrained(ckpt)
    assert main([str(data), "--model-path", str(ckpt)]) == 0
    bad_file = tmp_path / "bad.json"
    bad_file.write_text(json.dumps([quoting]))
    assert main([str(bad_file), "--model-path", str(ckpt)]) == 1


# -- builder --------------------------------------------------------------------------------------------

def test_builder_loads_by_sidecar_not_folder_name_and_refuses_disagreeing_ids(getok_setup, tmp_path, data):
    from llava.model.builder import load_pretrained_model

    trainer, _, _ = getok_setup
    folder = tmp_path / "my-run"  # no "llava" in the name: LLaVA's builder would take the plain-LM path
    trainer.save_model(str(folder))
    trainer.save_getok_files(str(folder))
    tokenizer, model, processor, _ = load_pretrained_model(str(folder), None, "my-run", device="cpu")
    assert type(model).__name__ == "LlavaLlamaForCausalLM" and model.dtype == torch.float32
    assert tokenizer.convert_tokens_to_ids(list(CFG.tokens())) == trainer.getok.ids
    sidecar = json.loads((folder / "getok_config.json").read_text())
    assert sidecar["kind"] == "full" and sidecar["frame"] == "pad" and sidecar["tokenizer_legacy"] is False

    tampered = tmp_path / "tampered"
    shutil.copytree(folder, tampered)
    sidecar["token_ids"] = [i + 1 for i in sidecar["token_ids"]]
    (tampered / "getok_config.json").write_text(json.dumps(sidecar))
    with pytest.raises(ValueError, match="refusing to load"):
        load_pretrained_model(str(tampered), None, "tampered", device="cpu")


def test_a_projector_type_the_model_does_not_have_is_refused_before_training(registered, tiny_llava_dir):
    """LLaVA keeps an existing projector whatever --mm_projector_type says and saves the new type in the config;
    the checkpoint then fails to load after training. The trainer refuses it at the start instead."""
    from llava.model import LlavaLlamaForCausalLM

    from llava_getok.llava.prepare import check_projector

    model = LlavaLlamaForCausalLM.from_pretrained(tiny_llava_dir)
    assert model.config.mm_projector_type == "mlp2x_gelu"
    check_projector(model)  # its own type: fine
    model.config.mm_projector_type = "linear"  # what initialize_vision_modules writes for --mm_projector_type linear
    with pytest.raises(ValueError, match=r"--mm_projector_type linear.*looks like 'mlp2x_gelu'.*--mm_projector_type mlp2x_gelu"):
        check_projector(model)


def test_data_order_file_trains_on_records_in_file_order(getok_setup):
    """--getok_data_order file: a curriculum written into the data file reaches the model in that order."""
    import dataclasses

    trainer, _, module = getok_setup
    ds = module["train_dataset"]
    shuffled = trainer._get_train_sampler()
    assert not isinstance(shuffled, torch.utils.data.SequentialSampler)  # the Trainer's own random order
    before = trainer.settings
    trainer.settings = dataclasses.replace(before, data_order="file")
    try:
        assert list(trainer._get_train_sampler()) == list(range(len(ds)))
        first = next(iter(trainer.get_train_dataloader()))
        expected = module["data_collator"]([ds[i] for i in range(min(len(ds), trainer.args.train_batch_size))])
        assert torch.equal(first["input_ids"], expected["input_ids"])
        trainer.args.group_by_modality_length = True
        with pytest.raises(ValueError, match="group_by_modality_length"):
            trainer._get_train_sampler()
    finally:
        trainer.args.group_by_modality_length = False
        trainer.settings = before
    with pytest.raises(ValueError, match="--getok_data_order must be one of"):
        dataclasses.replace(trainer.settings, data_order="sorted")
