"""Tiny, randomly initialised models of this backend's families, built offline from config objects and saved to a
folder, so that the real loading code (``from_pretrained``, ``AutoProcessor``) runs without the hub.

- Qwen2.5-VL: ``Qwen2_5_VLForConditionalGeneration`` (a tiny Qwen2 text model with multimodal rotary positions and a
  tiny windowed ViT with its patch merger), a Qwen2-layout byte-level BPE tokenizer trained here with the
  ``tokenizers`` library (Qwen's special tokens ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``,
  ``<|vision_start|>``, ``<|image_pad|>``, ...), Qwen2.5-VL's chat template and a ``Qwen2VLImageProcessor``;
  ``tie=True`` ties the embeddings, as the 3B model does.
- llava-hf: ``LlavaForConditionalGeneration`` (a tiny LLaMA and CLIP vision tower), a LLaMA-layout tokenizer folder
  given by the caller (``llava_getok.llava.tiny.train_tokenizer`` writes one) made fast, with ``<image>`` added, LLaVA's
  ``vicuna_v1`` conversation as its chat template and ``LlavaImageProcessor(do_pad=True)``: LLaVA-1.5's padded square.
"""
from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from .templates import VICUNA_SYSTEM, two_separator_template

QWEN_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
# Qwen2's pre-tokenizer split (its tokenizer.json): contractions, letters, single digits, punctuation, newlines
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
              r"|\s+(?!\S)|\s+")
QWEN_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == "
    "'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)
_WORDS = (
    "the a an of to in on at by for with from and or not is are where what which who please give answer box region "
    "point object image left right top bottom middle center above below next near small large big red green blue "
    "yellow purple orange black white gray pink brown circle square triangle star cross shape person dog cat car "
    "table cup tree sky find locate describe there no none nothing matches user assistant system helpful yes"
).split()


def _corpus(n_lines: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 12))]
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), f"{rng.random():.2f}")
        lines.append(" ".join(words).capitalize() + rng.choice([".", "?", "!", ",", ":"]))
    return lines + ["[0.12, 0.34, 0.56, 0.78] (1,2),(3,4) <>/_-=+*#@%&'\"()[]{};\n\n"]


def qwen_tokenizer(vocab_size: int = 600, seed: int = 0):
    """A Qwen2-layout ``Qwen2TokenizerFast``: byte-level BPE (Qwen2's split, NFC), Qwen's special tokens added after
    the learned pieces, eos ``<|im_end|>``, pad ``<|endoftext|>``, no bos, Qwen2.5-VL's chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import AddedToken, Qwen2TokenizerFast

    tok = Tokenizer(models.BPE(byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_corpus(3000, seed), trainer)
    fast = Qwen2TokenizerFast(tokenizer_object=tok, bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                              unk_token=None, errors="replace", clean_up_tokenization_spaces=False,
                              model_max_length=32768)
    special = [AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL]
    fast.add_special_tokens({"additional_special_tokens": special}, replace_additional_special_tokens=False)
    fast.chat_template = QWEN_CHAT_TEMPLATE
    return fast


@dataclass(frozen=True)
class TinyQwenConfig:
    """Sizes of the tiny Qwen2.5-VL. An image of ``image_size`` px gives (image_size / patch_size / merge_size)^2
    image tokens; the processor keeps between ``min_pixels`` and ``max_pixels`` pixels."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    vision_hidden_size: int = 32
    vision_layers: int = 2
    vision_heads: int = 2
    patch_size: int = 8
    merge_size: int = 2
    window_size: int = 32  # pixels; a multiple of patch_size * merge_size
    min_pixels: int = 16 * 16
    max_pixels: int = 64 * 64
    max_position_embeddings: int = 2048
    # Qwen2.5-VL's 1e6 leaves a head of 16 dimensions almost no rotation across an image's rows and columns (its
    # multimodal rotary sections get the slowest frequencies); a tiny model that must locate needs a smaller base
    rope_theta: float = 1e6
    tie: bool = False
    vocab_size: int = 600
    seed: int = 0


def build_tiny_qwen(out_dir, cfg: TinyQwenConfig = TinyQwenConfig()) -> Path:
    """Build and save a random Qwen2.5-VL with its tokenizer and processor in ``out_dir``."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessor

    from .family import ImageOnlyQwenProcessor, save_processor

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = qwen_tokenizer(cfg.vocab_size, cfg.seed)
    ids = dict(zip(QWEN_SPECIAL, tokenizer.convert_tokens_to_ids(list(QWEN_SPECIAL))))
    head_dim = cfg.hidden_size // cfg.num_heads
    half = head_dim // 2  # multimodal rotary positions: the rotary half-dimensions shared by time, height, width
    section = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]
    text = dict(vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                num_key_value_heads=cfg.num_kv_heads, max_position_embeddings=cfg.max_position_embeddings,
                rope_scaling={"type": "mrope", "mrope_section": section}, rope_theta=cfg.rope_theta,
                tie_word_embeddings=cfg.tie,
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    vision = dict(depth=cfg.vision_layers, hidden_size=cfg.vision_hidden_size,
                  intermediate_size=2 * cfg.vision_hidden_size, num_heads=cfg.vision_heads,
                  patch_size=cfg.patch_size, spatial_merge_size=cfg.merge_size, temporal_patch_size=2,
                  window_size=cfg.window_size, out_hidden_size=cfg.hidden_size,
                  fullatt_block_indexes=[cfg.vision_layers - 1])
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                              video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                              vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=cfg.tie)
    torch.manual_seed(cfg.seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.save_pretrained(out, safe_serialization=True)
    image_processor = Qwen2VLImageProcessor(min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels,
                                            patch_size=cfg.patch_size, merge_size=cfg.merge_size, temporal_patch_size=2)
    save_processor(ImageOnlyQwenProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                          chat_template=QWEN_CHAT_TEMPLATE), out)
    (out / "tiny_model.json").write_text(json.dumps({"family": "qwen2.5-vl", **asdict(cfg)}, indent=1))
    return out


@dataclass(frozen=True)
class TinyLlavaHFConfig:
    """Sizes of the tiny llava-hf. (image_size / patch_size)^2 image tokens (the CLS position dropped, as LLaVA-1.5)."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    vision_hidden_size: int = 32
    vision_layers: int = 2
    vision_heads: int = 2
    image_size: int = 32
    patch_size: int = 8
    vision_feature_layer: int = -2
    max_position_embeddings: int = 512
    system: str = VICUNA_SYSTEM  # the chat template's system prompt ("": none)
    seed: int = 0


def build_tiny_llava_hf(out_dir, tokenizer_dir, cfg: TinyLlavaHFConfig = TinyLlavaHFConfig()) -> Path:
    """Build and save a random ``LlavaForConditionalGeneration`` with a fast copy of the LLaMA-layout tokenizer in
    ``tokenizer_dir`` (``<image>`` added) and a ``LlavaProcessor`` with ``LlavaImageProcessor(do_pad=True)``."""
    import torch
    from transformers import (AddedToken, CLIPVisionConfig, LlamaConfig, LlamaTokenizerFast, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaImageProcessor, LlavaProcessor)

    from .family import save_processor

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = LlamaTokenizerFast.from_pretrained(str(tokenizer_dir), from_slow=True, legacy=False)
    tokenizer.add_special_tokens({"additional_special_tokens": [AddedToken("<image>", special=True, normalized=False)]})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token  # what LLaVA's train.py sets for its v1 templates
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                       num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                       num_key_value_heads=cfg.num_heads, max_position_embeddings=cfg.max_position_embeddings,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    vision = CLIPVisionConfig(hidden_size=cfg.vision_hidden_size, intermediate_size=2 * cfg.vision_hidden_size,
                              num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.vision_heads,
                              image_size=cfg.image_size, patch_size=cfg.patch_size,
                              projection_dim=cfg.vision_hidden_size)
    n_image = (cfg.image_size // cfg.patch_size) ** 2
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token,
                         vision_feature_layer=cfg.vision_feature_layer, vision_feature_select_strategy="default",
                         image_seq_length=n_image, projector_hidden_act="gelu", tie_word_embeddings=False)
    torch.manual_seed(cfg.seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    image_processor = LlavaImageProcessor(do_pad=True, size={"shortest_edge": cfg.image_size},
                                          crop_size={"height": cfg.image_size, "width": cfg.image_size})
    template = two_separator_template(cfg.system)
    tokenizer.chat_template = template
    save_processor(LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=cfg.patch_size,
                                  vision_feature_select_strategy="default", chat_template=template,
                                  num_additional_image_tokens=1), out)
    (out / "tiny_model.json").write_text(json.dumps({"family": "llava-hf", **asdict(cfg)}, indent=1))
    return out
