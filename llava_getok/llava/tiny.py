"""A tiny, randomly initialised LLaVA saved to disk, so LLaVA's real loading code runs without the hub.

Used by the tests and by the embedded demo: a LLaMA-layout sentencepiece tokenizer trained on the spot
(`<unk>`, `<s>`, `</s>` = 0, 1, 2, byte fallback) and a `LlavaLlamaForCausalLM` with a tiny LLaMA and a tiny
CLIP vision tower (its own folder, loaded by LLaVA's `CLIPVisionTower` like `openai/clip-vit-large-patch14`).
"""
from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass
from pathlib import Path

_WORDS = (
    "the a an of to in on at by for with from and or not is are was be this that it its which who what where "
    "please give provide output answer box bounding region point mask segment object objects image picture photo "
    "left right top bottom middle center above below next near far between behind front small large big tiny "
    "red green blue yellow purple orange black white gray pink brown circle square triangle star cross shape "
    "person man woman child dog cat car bus bike table chair cup bottle plate tree sky road building sign "
    "describe short description find locate where refer expression coordinates there no none nothing matches "
    "USER ASSISTANT A chat between a curious human and an artificial intelligence assistant The assistant gives "
    "helpful detailed polite answers to the human's questions Human Assistant system user gpt think yes "
    "Where What Which Please Give Find Locate Describe Is Are The There Output Answer Point Segment Yes No"
).split()


def _corpus(n_lines: int, seed: int) -> str:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 14))]
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), f"{rng.random():.2f}")
        if rng.random() < 0.2:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 1000)))
        lines.append(" ".join(words) + rng.choice([".", "?", "!", ",", ":"]))
    return "\n".join(lines + ["[0.12, 0.34, 0.56, 0.78] (1,2),(3,4) <>/_-=+*#@%&'\"()[]{};"])


def train_tokenizer(out_dir, vocab_size: int = 1000, seed: int = 0) -> Path:
    """Train a LLaMA-layout sentencepiece BPE (byte fallback) and save it as a slow `LlamaTokenizer` folder."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus(4000, seed).splitlines()),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        split_digits=True,
        # As in LLaMA's own vocabulary, "USER" right after "</s>" (a later round of LLaVA's v1 template) is one
        # piece and " USER" two: LLaVA's preprocess_v1 subtracts exactly that one token per later round.
        user_defined_symbols=["USER"],
        add_dummy_prefix=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        num_threads=1,
        minloglevel=2,
    )
    (out / "tokenizer.model").write_bytes(model.getvalue())
    tok = LlamaTokenizer(vocab_file=str(out / "tokenizer.model"), legacy=False, add_bos_token=True, add_eos_token=False)
    tok.pad_token = tok.unk_token  # what LLaVA's train.py sets for v1 templates
    tok.save_pretrained(out)
    return out


@dataclass(frozen=True)
class TinyLlavaConfig:
    """Sizes of the tiny model. image_size / patch_size give (image_size / patch_size)^2 image tokens."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    vision_hidden_size: int = 32
    vision_layers: int = 2
    vision_heads: int = 2
    vision_intermediate_size: int | None = None  # None: twice vision_hidden_size
    image_size: int = 32
    patch_size: int = 8
    max_position_embeddings: int = 512
    mm_projector_type: str = "mlp2x_gelu"
    mm_vision_select_layer: int = -2
    image_aspect_ratio: str = "pad"
    seed: int = 0


def build_vision_tower(out_dir, cfg: TinyLlavaConfig = TinyLlavaConfig()) -> Path:
    """Save a random CLIP vision tower + its image processor, loadable by LLaVA's `CLIPVisionTower`."""
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    out = Path(out_dir)
    torch.manual_seed(cfg.seed)
    vcfg = CLIPVisionConfig(
        hidden_size=cfg.vision_hidden_size, intermediate_size=cfg.vision_intermediate_size or 2 * cfg.vision_hidden_size,
        num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.vision_heads,
        image_size=cfg.image_size, patch_size=cfg.patch_size, projection_dim=cfg.vision_hidden_size,
    )
    CLIPVisionModel(vcfg).save_pretrained(out)
    CLIPImageProcessor(
        size={"shortest_edge": cfg.image_size}, crop_size={"height": cfg.image_size, "width": cfg.image_size}
    ).save_pretrained(out)
    return out


def build_tiny_llava(out_dir, tokenizer_dir, cfg: TinyLlavaConfig = TinyLlavaConfig(), projector: bool = True) -> Path:
    """Build a random `LlavaLlamaForCausalLM` (+ tiny CLIP tower in ``out_dir/vision_tower``), save it with the
    tokenizer to ``out_dir``. Name ``out_dir`` with "llava" in it: LLaVA's builder picks code paths by name.
    ``projector`` False: a language model only (as vicuna is before LLaVA's training adds the tower and projector);
    the tower is still saved in ``out_dir/vision_tower`` for ``--vision_tower``."""
    import torch
    from llava.model import LlavaConfig, LlavaLlamaForCausalLM
    from transformers import AutoTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tower = build_vision_tower(out / "vision_tower", cfg)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, use_fast=False)
    torch.manual_seed(cfg.seed)
    config = LlavaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
    )
    model = LlavaLlamaForCausalLM(config)
    if projector:
        model_args = _VisionArgs(vision_tower=str(tower.resolve()), mm_vision_select_layer=cfg.mm_vision_select_layer,
                                 mm_projector_type=cfg.mm_projector_type)
        model.get_model().initialize_vision_modules(model_args)
    model.config.image_aspect_ratio = cfg.image_aspect_ratio
    model.config.tokenizer_padding_side = "right"
    model.config.tokenizer_model_max_length = cfg.max_position_embeddings
    model.config.mm_use_im_start_end = False
    model.config.mm_use_im_patch_token = False
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "tiny_llava.json").write_text(json.dumps(cfg.__dict__, indent=1))
    return out


@dataclass
class _VisionArgs:
    """The fields of LLaVA's ModelArguments that `initialize_vision_modules` reads."""

    vision_tower: str
    mm_vision_select_layer: int = -2
    mm_vision_select_feature: str = "patch"
    pretrain_mm_mlp_adapter: str | None = None
    mm_patch_merge_type: str = "flat"
    mm_projector_type: str = "mlp2x_gelu"


def make_grounding_data(out_dir, coco_dir, cfg, n_records: int = 4, frame: str = "pad") -> Path:
    """A small LLaVA-format REC file from real COCO boxes (``coco_dir``: instances_val2017.json + val2017/):
    the largest object of the first ``n_records`` images that are present, its box encoded with ``cfg`` (any location
    format: a GETokConfig, formats.TextFormat or BinsFormat).
    Copies those images to ``out_dir/images``; returns the path of ``out_dir/data.json``."""
    import shutil

    from ..formats import encode_boxes, record_format_dict
    from ..geometry import boxes_to_frame, xywh_to_xyxy

    coco_dir, out = Path(coco_dir), Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    ann = json.loads((coco_dir / "instances_val2017.json").read_text())
    names = {c["id"]: c["name"] for c in ann["categories"]}
    by_image: dict[int, list] = {}
    for a in ann["annotations"]:
        if not a.get("iscrowd"):
            by_image.setdefault(a["image_id"], []).append(a)
    records = []
    for img in sorted(ann["images"], key=lambda i: i["file_name"]):
        src = coco_dir / "val2017" / img["file_name"]
        if not src.exists() or img["id"] not in by_image:
            continue
        a = max(by_image[img["id"]], key=lambda a: a["area"])
        box = boxes_to_frame(xywh_to_xyxy([a["bbox"]]), (img["width"], img["height"]), frame)[0]
        shutil.copyfile(src, out / "images" / img["file_name"])
        records.append({
            "id": f"coco-{img['id']}-ann{a['id']}-rec",
            "image": img["file_name"],
            "conversations": [
                {"from": "human", "value": f"<image>\nWhere is the {names[a['category_id']]}? Answer with a box."},
                {"from": "gpt", "value": encode_boxes([box.clip(0, 1).tolist()], cfg)[0]},
            ],
            "getok": {"source": "coco", "task": "rec", "frame": frame, "size": [img["width"], img["height"]],
                      **record_format_dict(cfg), "shapes": [{"kind": "box", "points": [a["bbox"][:2], [
                          a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]]}]},
        })
        if len(records) == n_records:
            break
    (out / "data.json").write_text(json.dumps(records, indent=1))
    return out / "data.json"



def supervised_data_module(tokenizer, model, data_json, template: str = "getok_v1") -> dict:
    """LLaVA's own data module (``LazySupervisedDataset`` + collator) for a file of :func:`make_grounding_data`, as
    LLaVA's ``train()`` builds it: images from the ``images`` folder beside it, ``pad`` aspect, the tower's image
    processor, and ``template`` made LLaVA's default conversation (a global of LLaVA's: restore it if it matters)."""
    from llava import conversation
    from llava.train.train import DataArguments, make_supervised_data_module

    data_json = Path(data_json)
    data_args = DataArguments(data_path=str(data_json), image_folder=str(data_json.parent / "images"),
                              is_multimodal=True, image_aspect_ratio="pad")
    data_args.image_processor = model.get_vision_tower().image_processor
    data_args.mm_use_im_start_end = False
    conversation.default_conversation = conversation.conv_templates[template]
    return make_supervised_data_module(tokenizer, data_args)
