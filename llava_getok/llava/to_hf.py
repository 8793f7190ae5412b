"""A loaded LLaVA 1.2.x model and one of its conversation templates as plain values, for ``llava-getok export``,
which writes them as llava-hf (``llava_getok.hf.export.llava_hf_from_llava``)."""
from __future__ import annotations

# the LLaMA config fields llava-hf's text config takes over
LLAMA_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_theta", "rope_scaling", "attention_bias",
              "mlp_bias", "head_dim", "bos_token_id", "eos_token_id", "pad_token_id")


def model_parts(model) -> dict:
    """The state dict (LoRA merged, GETok rows in, as the builder loaded them), the LLaMA config as a dict, the CLIP
    tower's config, and the settings that say how LLaVA feeds the tower's features and the image."""
    config = model.config
    return dict(state=dict(model.state_dict()),
                text_config={k: getattr(config, k) for k in LLAMA_KEYS if getattr(config, k, None) is not None},
                vision_config=model.get_vision_tower().vision_tower.config,
                select_layer=config.mm_vision_select_layer,
                select_feature=getattr(config, "mm_vision_select_feature", "patch"),
                projector=getattr(config, "mm_projector_type", "linear"),
                image_aspect_ratio=getattr(config, "image_aspect_ratio", "square"))


def conversation_parts(conv_mode: str) -> dict:
    """System prompt, roles and separators of LLaVA's ``conv_mode`` template (``register()`` adds the getok_* ones);
    ValueError for an unknown template or one that is not of LLaVA's two-separator kind."""
    from llava.conversation import SeparatorStyle, conv_templates

    if conv_mode not in conv_templates:
        raise ValueError(f"--conv-mode {conv_mode!r} is not a LLaVA conversation template")
    conv = conv_templates[conv_mode]
    if conv.sep_style != SeparatorStyle.TWO:
        raise ValueError(f"--conv-mode {conv_mode}: only LLaVA's two-separator conversations (vicuna_v1, llava_v1, "
                         f"getok_v1, ...) are written as chat templates, not {conv.sep_style.name}")
    return dict(system=conv.system, roles=tuple(conv.roles), sep=conv.sep, sep2=conv.sep2)
