"""``llava-getok demo --backend qwen2.5-vl`` end to end on the quick settings (a tiny random Qwen2.5-VL trained by
``python -m llava_getok.hf.train``, its predictions scored), and the llava-hf demo's model and training flags."""
import json


def test_qwen_demo_quick_runs_end_to_end(tmp_path, capsys):
    from llava_getok.demo import main

    assert main(["--backend", "qwen2.5-vl", "--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "tiny random Qwen2.5-VL" in out and "python -m llava_getok.hf.train" in out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["metrics"]["n"] == 4 and (tmp_path / "contact_sheet.png").is_file()
    sidecar = json.loads((tmp_path / "llava-getok-demo" / "getok_config.json").read_text())
    assert sidecar["backend"] == "hf" and sidecar["model_family"] == "qwen2.5-vl" and sidecar["frame"] == "orig"
    assert json.loads((tmp_path / "val.json").read_text())[0]["getok"]["frame"] == "orig"  # converted in its frame


def test_llava_hf_demo_model_and_flags(tiny_tokenizer_dir, tmp_path):
    """The llava-hf demo's model (the LLaVA demo's CLIP positions, no system prompt) and its training flags, which the
    entry point's parser takes as they are."""
    from transformers import LlavaForConditionalGeneration

    from llava_getok.demo.backends import build_hf_model, hf_train_args
    from llava_getok.demo.run import parser
    from llava_getok.hf.train import parse

    a = parser().parse_args(["--backend", "llava-hf", "--out", str(tmp_path), "--eval-every", "100"])
    model_dir = build_hf_model(tmp_path, a)
    model = LlavaForConditionalGeneration.from_pretrained(model_dir)
    positions = model.model.vision_tower.vision_model.embeddings.position_embedding.weight
    assert positions[0].abs().sum() == 0 and positions[1:, a.position_dims:].abs().sum() == 0  # the sincos code only
    assert "A chat between" not in (model_dir / "chat_template.jinja").read_text()
    argv = hf_train_args(model_dir, tmp_path / "train.json", tmp_path, tmp_path / "ck", a, file_order=True)
    _, _, settings, args = parse(argv)
    assert settings.train_vision_tower and settings.data_order == "file" and settings.sigma == a.sigma
    assert args.max_steps == a.steps and args.save_steps == 100 and not args.bf16 and not args.gradient_checkpointing
