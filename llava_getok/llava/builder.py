"""Builder hook: ``llava.model.builder.load_pretrained_model`` that loads GETok checkpoints exactly.

LLaVA's builder picks code paths by substrings of the folder name, takes the LoRA tokenizer from
``model_base``, loads in float16 even on CPU and ends with ``resize_token_embeddings(len(tokenizer))``
(docs/pitfalls.md "Loading checkpoints"). With the hook, a folder that has ``getok_config.json`` is loaded from
that sidecar instead, whatever its name:

1. tokenizer from the checkpoint, used with ``legacy=False`` as in training, its location tokens content (not
   special, also in a checkpoint saved when they were: ``tokens.location_tokens_as_content``, ids unchanged); its
   GETok ids must equal the recorded ones (else ValueError);
2. the model at the recorded vocabulary size: a full checkpoint directly, a LoRA or projector-only one from
   ``model_base`` (or the recorded base) resized to the recorded size *before* any checkpoint weight;
3. strict key accounting: every checkpoint key lands in a parameter, every parameter comes from somewhere;
4. the GETok rows (``getok_rows.safetensors``) and any trained vision-tower weights;
5. LoRA last, merged only into an unquantised base.

On CPU the model is float32 (LLaVA's float16 is slow or unsupported there); ``torch_dtype=`` overrides.
A plain LLaVA checkpoint (no sidecar) loads on CPU through the same steps; on CUDA it goes to LLaVA's own
builder unchanged.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from ..patching import PROCESS
from ..training.rows import ROWS_ATTR, set_rows
from ..training.sidecar import TOWER_FILE, read_rows, read_sidecar

TOWER_PREFIX = "model.vision_tower.vision_tower."
DEFAULT_CONTEXT_LEN = 2048


def _default_dtype(device: str):
    return torch.float16 if str(device).startswith("cuda") else torch.float32


def _read_state(folder: Path, keep=lambda k: True) -> dict:
    """Tensors of a saved model folder (safetensors single/sharded, or pytorch .bin) whose key passes ``keep``."""
    from safetensors import safe_open

    folder = Path(folder)
    files = []
    if (folder / "model.safetensors.index.json").exists():
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        files = sorted({folder / f for f in index["weight_map"].values()})
    elif (folder / "model.safetensors").exists():
        files = [folder / "model.safetensors"]
    state = {}
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():
                if keep(k):
                    state[k] = sf.get_tensor(k)
    if not files and (folder / "pytorch_model.bin").exists():
        state = {k: v for k, v in torch.load(folder / "pytorch_model.bin", map_location="cpu").items() if keep(k)}
    return state


def _normalise_keys(state: dict) -> dict:
    """Keys of LLaVA's non_lora_trainables.bin / mm_projector.bin as keys of the plain LLaVA model."""
    out = {}
    for k, v in state.items():
        while k.startswith("base_model.model."):
            k = k[len("base_model.model."):]
        out[k] = v
    return out


def _quantization(load_4bit, load_8bit, dtype):
    from transformers import BitsAndBytesConfig

    # as in training (LLaVA's train() + the head_unquantised fix): projector and LM head stay in full precision
    skip = ["mm_projector", "lm_head"]
    if load_4bit:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dtype, bnb_4bit_use_double_quant=True,
                                  bnb_4bit_quant_type="nf4", llm_int8_skip_modules=skip)
    if load_8bit:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return None


def copy_into_parameters(model, state: dict, source) -> None:
    """Copy ``state`` into ``model``'s parameters of the same names (strict: a key that matches no parameter
    is a KeyError naming ``source``; LLaVA's own ``load_state_dict(strict=False)`` drops it silently)."""
    params = dict(model.named_parameters())
    unknown = [k for k in state if k not in params]
    if unknown:
        raise KeyError(f"{source}: {len(unknown)} keys match no parameter of the model, e.g. {unknown[:3]}")
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v.to(params[k].dtype))


def load_getok_checkpoint(model_path, model_base=None, load_8bit=False, load_4bit=False, device="cpu",
                          torch_dtype=None, attn_implementation=None, sidecar=None):
    """Load a GETok (or plain LLaVA) checkpoint; returns LLaVA's tuple (tokenizer, model, processor, ctx)."""
    from llava.constants import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_IMAGE_PATCH_TOKEN
    from llava.model import LlavaLlamaForCausalLM
    from transformers import AutoTokenizer

    from ..training.tokens import location_tokens_as_content, resize_embeddings, use_non_legacy

    path = Path(model_path)
    sidecar = sidecar if sidecar is not None else read_sidecar(path)
    dtype = torch_dtype or _default_dtype(device)
    quant = _quantization(load_4bit, load_8bit, dtype)
    kwargs = dict(low_cpu_mem_usage=True, dtype=dtype, device_map={"": device}, output_loading_info=True)
    if quant is not None:
        kwargs["quantization_config"] = quant
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation

    tokenizer = AutoTokenizer.from_pretrained(path, use_fast=False)
    if sidecar is not None:
        use_non_legacy(tokenizer, str(path))  # a tokenizer_config.json without "legacy" (copied in by hand)
        location_tokens_as_content(tokenizer, sidecar.location_format)  # saved when they were special tokens
        sidecar.check_tokenizer(tokenizer, str(path))
    # LLaVA's own config class, as LLaVA's builder loads it: a stock checkpoint's config.json may say model_type
    # "llava" (liuhaotian/llava-v1.5-7b), which AutoConfig maps to transformers' own, differently shaped LlavaConfig
    config = LlavaLlamaForCausalLM.config_class.from_pretrained(path)
    kind = sidecar.kind if sidecar is not None else "full"
    tower_state = {}

    if kind == "full":
        model, info = LlavaLlamaForCausalLM.from_pretrained(path, config=config, **kwargs)
        unexpected = [k for k in info["unexpected_keys"] if not k.startswith(TOWER_PREFIX)]
        loaded_from_elsewhere = set()
        tower_state = _read_state(path, lambda k: k.startswith(TOWER_PREFIX))
    else:
        base = model_base or sidecar.base_model
        if not base:
            raise ValueError(f"{path}: a {kind} checkpoint needs model_base (none given, none recorded)")
        base_vocab = LlavaLlamaForCausalLM.config_class.from_pretrained(base).vocab_size
        config.vocab_size = base_vocab  # the base weights have this many rows; resized right after
        if hasattr(config, "quantization_config"):  # how a QLoRA run loaded its base, not how to load it now
            del config.quantization_config
        model, info = LlavaLlamaForCausalLM.from_pretrained(base, config=config, **kwargs)
        resize_embeddings(model, sidecar.vocab_size)
        extra_file = path / ("non_lora_trainables.bin" if kind == "lora" else "mm_projector.bin")
        if not extra_file.exists():
            raise FileNotFoundError(f"{extra_file}: missing; a {kind} checkpoint stores its non-LoRA weights there")
        extra = _normalise_keys(torch.load(extra_file, map_location="cpu"))
        extra = {k: v for k, v in extra.items() if not k.startswith(ROWS_ATTR + ".")}  # rows come from the rows file
        tower_state.update({k: v for k, v in extra.items() if k.startswith(TOWER_PREFIX)})
        extra = {k: v for k, v in extra.items() if not k.startswith(TOWER_PREFIX)}
        copy_into_parameters(model, extra, extra_file)
        loaded_from_elsewhere = set(extra)
        unexpected = [k for k in info["unexpected_keys"] if not k.startswith(TOWER_PREFIX)]

    missing = [k for k in info["missing_keys"] if k not in loaded_from_elsewhere and not k.startswith(TOWER_PREFIX)]
    if missing or unexpected:
        raise KeyError(f"{path}: key accounting failed: missing {missing[:5]} ({len(missing)}), "
                       f"unexpected {unexpected[:5]} ({len(unexpected)})")

    if sidecar is not None:
        if kind != "full":
            set_rows(model, read_rows(path, sidecar))
        rows = model.get_input_embeddings().weight.shape[0]
        if rows != sidecar.vocab_size or model.config.vocab_size != sidecar.vocab_size:
            raise ValueError(f"{path}: model has {rows} rows / config.vocab_size {model.config.vocab_size}, "
                             f"{sidecar.vocab_size} recorded")
    else:  # a plain LLaVA checkpoint: LLaVA's own token additions, never shrinking
        if getattr(model.config, "mm_use_im_patch_token", True):
            tokenizer.add_tokens([DEFAULT_IMAGE_PATCH_TOKEN], special_tokens=True)
        if getattr(model.config, "mm_use_im_start_end", False):
            tokenizer.add_tokens([DEFAULT_IM_START_TOKEN, DEFAULT_IM_END_TOKEN], special_tokens=True)
        if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            resize_embeddings(model, len(tokenizer))

    if kind == "lora":
        # before the tower is loaded, as in training (LLaVA applies LoRA while the tower is not built yet):
        # otherwise peft would inject fresh adapters into the tower's q/k/v projections too
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(path))
        if quant is None:  # merging into 4/8-bit weights would round the LoRA update away
            model = model.merge_and_unload()

    tower = model.get_vision_tower()
    if not tower.is_loaded:
        tower.load_model(device_map={"": device})
    if (path / TOWER_FILE).exists():
        from safetensors.torch import load_file

        tower_state.update({TOWER_PREFIX + k: v for k, v in load_file(str(path / TOWER_FILE)).items()})
    if tower_state:
        tower.vision_tower.load_state_dict({k[len(TOWER_PREFIX):]: v for k, v in tower_state.items()}, strict=True)
    tower.to(device=device, dtype=dtype)
    model.eval()
    context_len = getattr(model.config, "max_sequence_length", DEFAULT_CONTEXT_LEN)
    return tokenizer, model, tower.image_processor, context_len


HOOK_WHY = "load GETok checkpoints from their sidecar (llava_getok.llava.builder)"


def install_builder_hook() -> bool:
    """Replace ``llava.model.builder.load_pretrained_model``, and the same function in every LLaVA module imported
    before (llava.eval.*, llava.serve.*: they hold it under their own name); True if this call installed it."""
    import llava.model.builder as builder

    original = builder.load_pretrained_model
    if getattr(original, "__getok_hook__", False):
        return False

    def load_pretrained_model(model_path, model_base, model_name, load_8bit=False, load_4bit=False,
                              device_map="auto", device="cuda", use_flash_attn=False, **kwargs):
        sidecar = read_sidecar(model_path)
        on_cpu = not str(device).startswith("cuda")
        if sidecar is not None or (on_cpu and model_base is None and "llava" in str(model_name).lower()):
            return load_getok_checkpoint(
                model_path, model_base, load_8bit=load_8bit, load_4bit=load_4bit, device=device,
                torch_dtype=kwargs.get("torch_dtype"),
                attn_implementation="flash_attention_2" if use_flash_attn else kwargs.get("attn_implementation"),
                sidecar=sidecar)
        return original(model_path, model_base, model_name, load_8bit=load_8bit, load_4bit=load_4bit,
                        device_map=device_map, device=device, use_flash_attn=use_flash_attn, **kwargs)

    load_pretrained_model.__getok_hook__ = True
    load_pretrained_model.__doc__ = (original.__doc__ or "") + "\n(GETok hook: see llava_getok.llava.builder)"
    for name, module in list(sys.modules.items()):
        if (name == "llava" or name.startswith("llava.")) and getattr(module, "load_pretrained_model", None) is original:
            PROCESS.replace(module, "load_pretrained_model", load_pretrained_model, why=HOOK_WHY)
    return True


def uninstall_builder_hook() -> bool:
    """Give every LLaVA module that holds the hook its ``load_pretrained_model`` back; True if one was installed."""
    return bool(PROCESS.undo(where=lambda p: p.why == HOOK_WHY))
