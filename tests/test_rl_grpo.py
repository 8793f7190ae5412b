"""GRPO with the tiny LLaVA on CPU: log-probs through LLaVA's image path, two steps end to end with images and
checkpoints, grid -> refine stage hand-over, and a learning check with a fixed seed."""
import json
import shutil
from pathlib import Path

import pytest
import torch

GRID = {"grid": 4, "rounds": 0, "offset_levels": 3, "schedule": "halving", "mode": "grid"}
REFINE = {"grid": 4, "rounds": 1, "offset_levels": 3, "schedule": "halving", "mode": "refine"}


@pytest.fixture(scope="module")
def getok_ckpt(tiny_llava_dir, tmp_path_factory):
    """The tiny LLaVA made a GETok checkpoint (grid 4, refine-capable vocabulary) as SFT would leave it."""
    from llava_getok.llava import register
    from llava_getok.llava.builder import load_getok_checkpoint
    from llava_getok.training.sidecar import Sidecar
    from llava_getok.training.tokens import add_getok_tokens, init_getok_rows, resize_embeddings
    from llava_getok.rl.checkpoint import save_getok_checkpoint
    from llava_getok.vocab import GETokConfig

    register()
    torch.manual_seed(0)
    tok, model, _, _ = load_getok_checkpoint(tiny_llava_dir)
    cfg = GETokConfig(**REFINE)
    ids = add_getok_tokens(tok, cfg)
    n_old = resize_embeddings(model, len(tok))
    init_getok_rows(model, ids, cfg, n_old=n_old)
    sidecar = Sidecar.of(cfg, ids, vocab_size=len(tok), tokenizer_legacy=getattr(tok, "legacy", None), frame="pad",
                         kind="full", template="getok_v1", processor={"image_aspect_ratio": "pad"})
    out = tmp_path_factory.mktemp("ckpt") / "getok-tiny"
    return save_getok_checkpoint(model, tok, out, sidecar, None, quantized=False, final=True)


@pytest.fixture(scope="module")
def data(shared_data, tmp_path_factory):
    """One real COCO image, one target box (rec), and a refine record on the same image."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("images")
    src = sorted((shared_data / "coco_mini" / "val2017").glob("*.jpg"))[0]
    shutil.copy(src, folder / src.name)
    w, h = Image.open(src).size
    box = [[0.1 * w, 0.2 * h], [0.5 * w, 0.7 * h]]
    rec = {"id": "rec-1", "image": src.name,
           "conversations": [{"from": "human", "value": "<image>\nWhere is the object? Answer with a box."},
                             {"from": "gpt", "value": "<box><grid_0_1><grid_2_2></box>"}],
           "getok": {"task": "rec", "frame": "pad", "size": [w, h], "config": GRID,
                     "shapes": [{"kind": "box", "points": box}]}}
    refine = {"id": "ref-1", "image": src.name,
              "conversations": [rec["conversations"][0], {"from": "gpt", "value": "<box><grid_0_1><grid_2_2></box>"},
                                {"from": "human", "value": "You answered <box><grid_0_1><grid_2_2></box>. Refine it."},
                                {"from": "gpt", "value": "<offset><box><off_0_0><off_0_0></box></offset>"}],
              "getok": {**rec["getok"], "config": REFINE}}  # as convert-datasets writes it: task rec, mode refine
    (folder / "rec.json").write_text(json.dumps([rec]))
    (folder / "refine.json").write_text(json.dumps([refine]))
    return folder


def _args(getok_ckpt, folder, out, **kw):
    from llava_getok.rl.run import RLArgs

    base = dict(model_path=str(getok_ckpt), data=str(folder / "rec.json"), image_folder=str(folder), output_dir=str(out),
                num_generations=4, max_steps=2, max_new_tokens=8, learning_rate=1e-3, beta=0.0, lora_r=4,
                lora_alpha=8, lora_dropout=0.0, save_steps=1000, device="cpu", bf16=False,
                gradient_checkpointing=False, seed=0)
    return RLArgs(**{**base, **kw})


def test_logps_follow_llava_image_path(getok_ckpt, data, tmp_path):
    """The trainer's completion log-probs equal a plain per-row LLaVA forward with the image (no padding,
    LLaVA's own splice), for completions of different lengths, with non-zero GETok-row deltas."""
    from llava_getok.rl.run import build_trainer
    from llava_getok.llava.prepare import unwrap_llava

    trainer = build_trainer(_args(getok_ckpt, data, tmp_path))
    rows = unwrap_llava(trainer.model).getok_rows
    with torch.no_grad():
        rows.input_delta.normal_(0, 0.5)
        rows.output_delta.normal_(0, 0.5)
    tok = trainer.processing_class
    row = trainer.train_dataset[0]
    prompt = trainer._tokenize_prompts([row["prompt"]])[0][0]
    assert prompt.count(-200) == 1  # one image token: LLaVA expands it, nobody else
    box, g00, g22, close = tok.convert_tokens_to_ids(["<box>", "<grid_0_0>", "<grid_2_2>", "</box>"])
    completions = [[box, g00, g22, close, tok.eos_token_id], [box, g22]]
    images = torch.stack([trainer._images_for([row])[0]] * 2)
    k = max(map(len, completions))
    ids = torch.tensor([prompt + c + [tok.pad_token_id] * (k - len(c)) for c in completions])
    mask = torch.tensor([[1] * len(prompt) + [1] * len(c) + [0] * (k - len(c)) for c in completions])
    trainer.model.eval()
    with torch.no_grad():
        logps, ent, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, k, compute_entropy=True,
                                                                   pixel_values=images)
        for i, c in enumerate(completions):
            full = torch.tensor([prompt + c])
            logits = trainer.model(input_ids=full, images=images[i : i + 1]).logits[0]
            want = torch.log_softmax(logits[-len(c) - 1 : -1], -1).gather(1, torch.tensor(c)[:, None])[:, 0]
            torch.testing.assert_close(logps[i, : len(c)], want, atol=1e-5, rtol=1e-5)
            assert logps[i, len(c):].abs().sum() == 0 and ent[i, len(c):].abs().sum() == 0


def test_lora_reference_is_the_starting_model_after_rows_and_adapters_moved(getok_ckpt, data, tmp_path):
    """Under LoRA trl scores the KL reference inside ``disable_adapter()``: it must be the starting model, with
    the trained GETok-row deltas off as well, or the KL never holds the GETok rows to where they started."""
    from trl.trainer.utils import use_adapter

    from llava_getok.rl.run import build_trainer
    from llava_getok.llava.prepare import unwrap_llava

    trainer = build_trainer(_args(getok_ckpt, data, tmp_path, beta=0.04))
    assert trainer.ref_model is None  # trl's PEFT reference: the same model, adapters disabled
    assert "ref" not in trainer.model.peft_config  # not trl's copy of the adapter, which leaves the row deltas on
    row = trainer.train_dataset[0]
    prompt = trainer._tokenize_prompts([row["prompt"]])[0][0]
    tok = trainer.processing_class
    completion = tok.convert_tokens_to_ids(["<box>", "<grid_0_0>", "<grid_2_2>", "</box>"])
    ids, mask = torch.tensor([prompt + completion]), torch.ones(1, len(prompt) + len(completion), dtype=torch.long)
    images = trainer._images_for([row])
    score = lambda: trainer._get_per_token_logps_and_entropies(  # noqa: E731
        trainer.model, ids, mask, len(completion), pixel_values=images)[0]
    trainer.model.eval()
    with torch.no_grad():
        start = score()
        rows = unwrap_llava(trainer.model).getok_rows
        rows.input_delta.normal_(0, 0.5)
        rows.output_delta.normal_(0, 0.5)
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
        moved = score()
        with use_adapter(trainer.model, adapter_name="ref" if "ref" in trainer.model.peft_config else None):  # as trl
            reference = score()
        after = score()
    assert (moved - start).abs().max() > 1e-2  # the policy did move
    torch.testing.assert_close(reference, start, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(after, moved)  # the deltas are back on after the reference
    assert rows.enabled


def test_two_grpo_steps_then_refine_stage(getok_ckpt, data, tmp_path):
    """Two steps with images (LoRA + GETok rows, KL against the adapter-free model), a loadable checkpoint
    at every save, only adapters and rows changed; then the refine stage starts from the grid-stage output."""
    from llava_getok.llava.builder import load_getok_checkpoint
    from llava_getok.training.sidecar import read_sidecar
    from llava_getok.rl.run import run

    args = _args(getok_ckpt, data, tmp_path / "grid", beta=0.04, save_steps=1, constrained=True,
                 constrain_only="box", max_new_tokens=6)  # a random model writes no box unconstrained
    trainer = run(args)
    logs = [h for h in trainer.state.log_history if "reward" in h]
    assert len(logs) == 2 and trainer.state.global_step == 2
    for key in ("reward", "frac_reward_zero_std", "rewards/grounding/mean", "grounding/unparseable", "kl"):
        assert key in logs[0], key

    ids = read_sidecar(getok_ckpt).token_ids
    start = load_getok_checkpoint(getok_ckpt)[1].state_dict()
    for folder in (tmp_path / "grid" / "checkpoint-1", tmp_path / "grid"):  # every save loads on its own
        tok, model, _, _ = load_getok_checkpoint(folder)
        assert tok.convert_tokens_to_ids(["<grid_3_3>"]) == [ids[15]]
        assert read_sidecar(folder).kind == ("lora" if "checkpoint" in folder.name else "full")
    final = model.state_dict()  # the final save: adapter merged, GETok rows folded in
    changed = sorted(k for k in start if not torch.equal(start[k], final[k]))
    assert any(k.endswith("q_proj.weight") for k in changed) and "model.embed_tokens.weight" in changed
    assert all(k.startswith("model.layers.") and k.endswith("proj.weight") or k in (
        "model.embed_tokens.weight", "lm_head.weight") for k in changed), changed
    other = torch.ones(len(start["lm_head.weight"]), dtype=torch.bool)
    other[ids] = False
    for key in ("model.embed_tokens.weight", "lm_head.weight"):  # only the GETok rows moved
        assert torch.equal(start[key][other], final[key][other])

    refine = _args(tmp_path / "grid", data, tmp_path / "refine", stage="refine", data=str(data / "refine.json"),
                   max_steps=1, max_new_tokens=8, constrained=True, constrain_only="refinement", first_answer="policy")
    trainer = run(refine)
    log = [h for h in trainer.state.log_history if "reward" in h][0]
    assert "rewards/refine/mean" in log and "rewards/format/mean" in log
    # the refine question was re-asked about the policy's own (grammar-constrained, greedy) first answer
    for prompt in trainer._logs["prompt"]:
        first = prompt.split("ASSISTANT:")[1].split("</s>")[0].strip()
        assert first.startswith("<box><grid_") and first.endswith("</box>")
        assert f"You answered {first}. Refine it." in prompt
        assert first != "<box><grid_0_1><grid_2_2></box>"  # not the data's (a random model's box differs)
    assert read_sidecar(tmp_path / "refine").kind == "full"


def test_seed_reproduces_a_grpo_run(getok_ckpt, data, tmp_path):
    """--seed seeds before the policy's LoRA adapters are made: two runs of one configuration log the same rewards,
    losses and KL, whatever the process's random state was."""
    from llava_getok.rl.run import run

    logs = []
    for k in range(2):
        torch.manual_seed(1000 + k)
        trainer = run(_args(getok_ckpt, data, tmp_path / f"run{k}", beta=0.04, constrained=True, constrain_only="box",
                            max_new_tokens=6, learning_rate=2e-2, seed=5))
        logs.append([{key: h[key] for key in ("loss", "reward", "kl", "grad_norm") if key in h}
                     for h in trainer.state.log_history if "reward" in h])
    assert len(logs[0]) == 2 and {"loss", "reward", "kl"} <= set(logs[0][1]) and logs[0] == logs[1], logs


def test_learning_one_image_one_box(getok_ckpt, data, tmp_path):
    """Fixed seed, one image, one target box, grammar-constrained rollouts: the mean reward of the last
    steps beats that of the first steps."""
    from llava_getok.rl.run import run

    args = _args(getok_ckpt, data, tmp_path, rewards="box", constrained=True, constrain_only="box",
                 num_generations=8, max_steps=12, learning_rate=2e-2, max_new_tokens=6)
    trainer = run(args)
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    assert len(rewards) == 12
    first, last = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    assert last > first + 0.1, rewards


def test_rows_from_converted_records(data):
    """Prompt rows: LLaVA's template up to the trained answer, the refine first answer, counted skips, and
    clear errors for a record made for another frame or grid, or whose image is missing."""
    from llava_getok.records import read_records
    from llava_getok.rl.data import build_rows
    from llava_getok.vocab import GETokConfig

    recs = read_records(data / "rec.json") + read_records(data / "refine.json")
    rows, skipped = build_rows(recs, "grid", data, "llava_v1", "x.json", frame="pad", config=GETokConfig(**GRID))
    assert len(rows) == 1 and dict(skipped) == {"task refine (not a grid-stage task)": 1}
    assert rows[0]["prompt"].endswith("Answer with a box. ASSISTANT:") and rows[0]["prompt"].count("<image>") == 1
    assert json.loads(rows[0]["getok"])["task"] == "rec" and Path(rows[0]["image_path"]).is_file()
    rows, _ = build_rows(recs, "refine", data, "llava_v1")
    assert rows[0]["first_answer"] == "<box><grid_0_1><grid_2_2></box>" and "Refine it. ASSISTANT:" in rows[0]["prompt"]
    with pytest.raises(ValueError, match=r"x.json, record 0 \(id 'rec-1'\): field 'getok.frame' is 'pad'"):
        build_rows(recs, "grid", data, "llava_v1", "x.json", frame="orig")
    with pytest.raises(ValueError, match="'getok.config.grid' is 4, the model was trained with 32"):
        build_rows(recs, "grid", data, "llava_v1", "x.json", config=GETokConfig())
    with pytest.raises(FileNotFoundError, match="field 'image' 'missing.jpg'"):
        build_rows([{**recs[0], "image": "missing.jpg"}], "grid", data, "llava_v1")
