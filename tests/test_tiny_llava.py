"""The tiny LLaVA the other tests build on loads through LLaVA's own builder and runs forward with images."""
import json

import torch


def test_tiny_llava_loads_with_llavas_builder_and_runs(tiny_llava_dir):
    from llava.mm_utils import process_images
    from llava.model.builder import load_pretrained_model
    from PIL import Image

    tokenizer, model, processor, _ = load_pretrained_model(str(tiny_llava_dir), None, "tiny-llava", device="cpu")
    assert type(model).__name__ == "LlavaLlamaForCausalLM"
    assert tokenizer.convert_tokens_to_ids(["<unk>", "<s>", "</s>"]) == [0, 1, 2]
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)
    cfg = json.loads((tiny_llava_dir / "tiny_llava.json").read_text())
    images = process_images([Image.new("RGB", (48, 20), "red")], processor, model.config).float()
    assert images.shape == (1, 3, cfg["image_size"], cfg["image_size"])
    model = model.float()
    ids = torch.tensor([[1, 5, 6, -200, 7, 8]])  # -200: LLaVA's IMAGE_TOKEN_INDEX
    with torch.no_grad():
        out = model(input_ids=ids, images=images)
    n_image_tokens = (cfg["image_size"] // cfg["patch_size"]) ** 2
    assert out.logits.shape == (1, 5 + n_image_tokens, len(tokenizer))
    assert torch.isfinite(out.logits).all()
