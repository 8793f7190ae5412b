"""GRPO (``python -m llava_getok.rl``) from checkpoints of the transformers-native backend, on CPU in float32: the tiny
Qwen2.5-VL after a LoRA SFT of ``python -m llava_getok.hf.train`` (GETok rows as peft's trainable tokens), and the
tiny llava-hf after full fine-tuning. The backend comes from the checkpoint's sidecar; the prompts are SFT's; the KL
reference is the starting model once the GETok rows moved; both stages run; every checkpoint loads back and predicts.
The recipes on two CPU ranks: tests/test_recipes.py (scripts/gpu_check.sh)."""
import json
from pathlib import Path

import pytest
import torch
from hf_helpers import train_argv, train_here

BOX = "<box><grid_0_3><grid_1_4></box>"


@pytest.fixture(scope="module")
def qwen_sft(tiny_qwen_dir, hf_grounding, tmp_path_factory):
    """A LoRA SFT checkpoint of the tiny Qwen2.5-VL (2 steps, r 4), as ``python -m llava_getok.hf.train`` writes it."""
    out = tmp_path_factory.mktemp("qwen-sft") / "out"
    train_here(train_argv(tiny_qwen_dir, hf_grounding["orig"], out, "--lora_enable", "True", "--lora_r", "4",
                          "--lora_alpha", "8", "--save_strategy", "no", steps=2))
    return out


@pytest.fixture(scope="module")
def refine_data(hf_grounding, tmp_path_factory):
    """The first record as a refine record (a grid-only first answer, then offsets), beside the same images."""
    src = Path(hf_grounding["orig"])
    rec = json.loads(src.read_text())[0]
    question = rec["conversations"][0]
    rec = {**rec, "id": "refine-1", "conversations": [
        question, {"from": "gpt", "value": BOX},
        {"from": "human", "value": f"You answered {BOX}. Refine it."},
        {"from": "gpt", "value": "<offset><box><off_0_0><off_1_1></box></offset>"}],
        "getok": {**rec["getok"], "config": {**rec["getok"]["config"], "mode": "refine", "rounds": 1}}}
    out = src.parent / "refine.json"
    out.write_text(json.dumps([rec]))
    return out


def _args(model, data, out, **kw):
    from llava_getok.rl.run import RLArgs

    base = dict(model_path=str(model), data=str(data), image_folder=str(Path(data).parent / "images"),
                output_dir=str(out), num_generations=4, max_steps=2, max_new_tokens=8, learning_rate=5e-2, beta=0.04,
                lora_r=4, lora_alpha=8, lora_dropout=0.0, save_steps=1000, device="cpu", bf16=False,
                gradient_checkpointing=False, seed=0, constrained=True, constrain_only="box")
    return RLArgs(**{**base, **kw})


def _probe(processor, data):
    """(prompt inputs of the first record as SFT and predict make them, completion ids of a GETok box + end of turn)."""
    from llava_getok.hf.generate import prompt_text
    from llava_getok.images import load_image

    rec = json.loads(Path(data).read_text())[0]
    image = load_image(Path(data).parent / "images" / rec["image"])
    inputs = processor(text=[prompt_text(processor, rec["conversations"][:1])], images=[image], return_tensors="pt")
    tok = processor.tokenizer
    completion = tok.convert_tokens_to_ids(["<box>", "<grid_0_3>", "<grid_1_4>", "</box>"]) + [tok.eos_token_id]
    return inputs, completion, image


def test_reference_is_the_starting_model_after_the_getok_rows_moved(qwen_sft, hf_grounding, tmp_path):
    """Steps of GRPO under LoRA move the GETok rows (peft's trainable tokens) and the adapters; the reference trl
    scores the KL against (adapters disabled, through trl's fused LM head, which reads the head's weight) is then still
    the starting model: the SFT checkpoint loaded on its own. The prompts are the ones SFT trained on."""
    from trl.trainer.utils import use_adapter

    from llava_getok.hf.checkpoint import load_checkpoint
    from llava_getok.rl.run import build_trainer

    data = hf_grounding["orig"]
    trainer = build_trainer(_args(qwen_sft, data, tmp_path))
    processor = trainer.processing_class
    inputs, completion, image = _probe(processor, data)
    from trl.data_utils import prepare_multimodal_messages

    from llava_getok.hf.data import turn_messages

    row = trainer.train_dataset[0]
    messages = prepare_multimodal_messages(turn_messages(json.loads(row["conversation"])), images=[image])
    assert trainer._tokenize_prompts([messages])[0][0] == inputs["input_ids"][0].tolist()  # SFT's and predict's

    peft_model = trainer.model
    delta = next(p for n, p in peft_model.named_parameters() if "trainable_tokens_delta" in n)
    start_rows = delta.detach().clone()
    trainer.train()
    assert (delta.detach() - start_rows).abs().max() > 1e-3  # the GETok rows moved
    assert any(p.abs().max() > 0 for n, p in peft_model.named_parameters() if "lora_B" in n)
    assert "ref" not in peft_model.peft_config and trainer.ref_model is None  # trl disables the adapters instead

    ids = torch.cat([inputs["input_ids"], torch.tensor([completion])], 1)
    mask = torch.ones_like(ids)
    k = len(completion)
    extra = {"pixel_values": inputs["pixel_values"], "image_grid_thw": inputs["image_grid_thw"], "num_images": [1]}
    trainer.model.eval()
    with torch.no_grad():
        policy = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, k, **extra)[0]
        with use_adapter(peft_model, adapter_name="ref" if "ref" in peft_model.peft_config else None):  # as trl does
            reference = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, k, **extra)[0]
        _, start, _ = load_checkpoint(qwen_sft)
        logits = start(input_ids=ids, attention_mask=mask, pixel_values=inputs["pixel_values"],
                       image_grid_thw=inputs["image_grid_thw"]).logits[0, -k - 1 : -1]
    want = torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(completion)[:, None])[:, 0]
    assert (policy[0] - want).abs().max() > 1e-2  # the policy did move
    torch.testing.assert_close(reference[0], want, atol=1e-4, rtol=1e-4)


def test_grid_then_refine_from_a_qwen_lora_sft_checkpoint(qwen_sft, hf_grounding, refine_data, tmp_path):
    """``python -m llava_getok.rl`` on the SFT checkpoint (bf16 autocast over float32 weights): the grid stage's
    checkpoints (every save) are LoRA checkpoints on it that load back with their rows and answer in
    ``llava-getok predict``; the refine stage starts
    from the grid stage's output and refines the policy's own first answers."""
    from llava_getok.cli import main as cli
    from llava_getok.hf.checkpoint import load_checkpoint
    from llava_getok.rl.__main__ import main as grpo
    from llava_getok.rl.run import run
    from llava_getok.training.sidecar import read_sidecar

    data, grid = hf_grounding["orig"], tmp_path / "grid"
    assert grpo(["--model-path", str(qwen_sft), "--data", str(data), "--image-folder", str(Path(data).parent / "images"),
                 "--output-dir", str(grid), "--num-generations", "4", "--max-steps", "2", "--save-steps", "1",
                 "--max-new-tokens", "8", "--lora-r", "4", "--lora-alpha", "8", "--device", "cpu", "--bf16",
                 "--constrained", "--constrain-only", "box"]) == 0  # bf16 autocast, gradient checkpointing: as on GPUs
    ids = read_sidecar(qwen_sft).token_ids
    for folder in (grid / "checkpoint-1", grid):
        sidecar = read_sidecar(folder)
        assert sidecar.backend == "hf" and sidecar.kind == "lora" and sidecar.base_model == str(qwen_sft)
        assert sidecar.token_ids == ids and sidecar.settings["grpo"]["stage"] == "grid"
        processor, model, _ = load_checkpoint(folder)  # the rows are checked against getok_rows.safetensors
        assert not (folder / "ref").exists()  # no copy of the adapter
    preds = tmp_path / "preds.jsonl"
    assert cli(["predict", "--model-path", str(grid), "--data", str(data), "--image-root",
                str(Path(data).parent / "images"), "--output", str(preds), "--max-new-tokens", "12",
                "--shape-only"]) == 0
    lines = [json.loads(x) for x in preds.read_text().splitlines()]
    assert len(lines) == 2 and all(x["shapes"] and x["shapes"][0]["kind"] == "box" for x in lines)

    trainer = run(_args(grid, refine_data, tmp_path / "refine", stage="refine", max_steps=1, constrain_only="refinement",
                        first_answer="policy", max_new_tokens=10))
    log = next(h for h in trainer.state.log_history if "reward" in h)
    assert "rewards/refine/mean" in log and "rewards/format/mean" in log
    for messages in trainer._logs["prompt"]:  # re-asked about the policy's own (constrained, greedy) first answer
        first = messages[1]["content"][0]["text"]
        assert first.startswith("<box><grid_") and first.endswith("</box>") and first != BOX
        assert f"You answered {first}. Refine it." in messages[2]["content"][-1]["text"]
    sidecar = read_sidecar(tmp_path / "refine")
    assert sidecar.kind == "lora" and sidecar.base_model == str(grid)
    load_checkpoint(tmp_path / "refine")  # three folders deep: refine on grid on SFT on the base model


def test_full_fine_tuning_of_llava_hf_keeps_its_own_reference(tiny_llava_hf_dir, hf_grounding, tmp_path):
    """Full fine-tuning (``--no-lora``) of a llava-hf checkpoint: the reference is a frozen copy of the starting model
    (not trl's reload from a path), one step runs with the KL term, and the full checkpoint loads back."""
    from llava_getok.hf.checkpoint import load_checkpoint
    from llava_getok.rl.run import run
    from llava_getok.training.sidecar import read_sidecar

    data = hf_grounding["pad"]
    sft = tmp_path / "sft"
    train_here(train_argv(tiny_llava_hf_dir, data, sft, "--save_strategy", "no", steps=1))
    trainer = run(_args(sft, data, tmp_path / "grpo", lora=False, max_steps=1, learning_rate=1e-3))
    assert trainer.ref_model is not None and not any(p.requires_grad for p in trainer.ref_model.parameters())
    assert "kl" in next(h for h in trainer.state.log_history if "reward" in h)
    assert read_sidecar(tmp_path / "grpo").kind == "full"
    _, model, _ = load_checkpoint(tmp_path / "grpo")
    assert type(model).__name__ == "LlavaForConditionalGeneration"
