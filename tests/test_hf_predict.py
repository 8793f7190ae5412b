"""``llava-getok predict / eval / show`` on checkpoints of llava_getok.hf, the backend read from the sidecar:
grammar-constrained generation through the model's own ``generate``, prompts exactly as training rendered them."""
import json

import pytest
import torch
from hf_helpers import CFG


@pytest.mark.parametrize("family", ["qwen", "llava"])
def test_the_generation_prompt_is_the_training_prompt(family, tiny_qwen_dir, tiny_llava_hf_dir, hf_grounding):
    """The prompt predict hands the model is, token for token, what training put before the first answer."""
    from llava_getok.hf.data import encode, load_image
    from llava_getok.hf.family import load_processor
    from llava_getok.hf.generate import prompt_text
    from llava_getok.training.tokens import add_getok_tokens

    model_dir, data = {"qwen": (tiny_qwen_dir, hf_grounding["orig"]),
                       "llava": (tiny_llava_hf_dir, hf_grounding["pad"])}[family]
    processor = load_processor(model_dir)
    add_getok_tokens(processor.tokenizer, CFG)
    record = json.loads(data.read_text())[0]
    trained = encode(processor, record, data.parent / "images")
    first_label = int((trained["labels"] != -100).nonzero()[0])
    prompt = processor(text=[prompt_text(processor, record["conversations"][:1])],
                       images=[load_image(record, data.parent / "images")], return_tensors="pt")
    assert torch.equal(prompt["input_ids"][0], trained["input_ids"][:first_label])
    assert torch.equal(prompt["pixel_values"], trained["pixel_values"])


def test_predict_eval_and_show_read_the_backend_from_the_sidecar(hf_full_run, hf_lora_run, hf_grounding, tmp_path):
    from llava_getok.cli import main

    for (_, out), frame in ((hf_full_run, "orig"), (hf_lora_run, "pad")):
        data = hf_grounding[frame]
        images = str(data.parent / "images")
        preds = tmp_path / f"{frame}.jsonl"
        assert main(["predict", "--model-path", str(out), "--data", str(data), "--image-root", images,
                     "--output", str(preds), "--shape-only", "--device", "cpu", "--max-new-tokens", "16"]) == 0
        lines = [json.loads(x) for x in preds.read_text().splitlines()]
        assert len(lines) == 2 and all(x["errors"] == [] and [s["kind"] for s in x["shapes"]] == ["box"] for x in lines)
        assert all(x["text"].startswith("<box><grid_") and x["text"].endswith("</box>") for x in lines), lines
        result = tmp_path / f"eval-{frame}"
        assert main(["eval", "--predictions", str(preds), "--annotations", str(data), "--output-dir", str(result)]) == 0
        metrics = json.loads((result / f"{frame}.metrics.json").read_text())
        assert metrics["formats"]["rec"]["coco"].startswith("getok, grid 8")
        sheet = tmp_path / f"{frame}.png"
        assert main(["show", "--predictions", str(preds), "--annotations", str(data), "--image-root", images,
                     "--output", str(sheet), "--no-masks"]) == 0 and sheet.stat().st_size > 0


def test_unconstrained_answers_and_a_frame_mismatch(hf_full_run, hf_grounding, tmp_path, capsys):
    from llava_getok.cli import main

    _, out = hf_full_run
    data = hf_grounding["orig"]
    preds = tmp_path / "free.jsonl"
    assert main(["predict", "--model-path", str(out), "--data", str(data), "--image-root", str(data.parent / "images"),
                 "--output", str(preds), "--no-constrained", "--device", "cpu", "--max-new-tokens", "6"]) == 0
    ids = [json.loads(x)["id"] for x in preds.read_text().splitlines()]
    assert ids == [r["id"] for r in json.loads(data.read_text())]
    padded = hf_grounding["pad"]
    assert main(["predict", "--model-path", str(out), "--data", str(padded), "--image-root",
                 str(padded.parent / "images"), "--output", str(tmp_path / "x.jsonl"), "--device", "cpu"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "records are in frame(s) ['pad'], but the model sees frame 'orig'" in err


def test_the_backend_of_a_folder(hf_lora_run, tiny_llava_hf_dir, tmp_path):
    from llava_getok.predict import backend_of

    _, out = hf_lora_run
    assert backend_of(str(out)) == "hf"  # its sidecar says so
    assert backend_of(str(tiny_llava_hf_dir)) == "hf"  # a stock llava-hf folder: its config's model type
    for model_type in ("llava_llama", "llava"):  # LLaVA 1.2.x's own checkpoints say either, without a vision_config
        (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type, "mm_vision_tower": "clip"}))
        assert backend_of(str(tmp_path)) == "llava"
