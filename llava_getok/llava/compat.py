"""Fixes that let LLaVA 1.2.2 run on current transformers / peft / torch (docs/llava-compat.md).

Each fix is a :class:`Fix`: a name, a ``needed()`` test that looks at the installed code (not at version
numbers where a feature test is possible) and an ``apply()`` that wraps LLaVA's function, keeping the
original reachable as ``__getok_original__``. :func:`apply_compat_fixes` applies those that are needed, once, and
returns the names it applied this call (peft style: it says what it changed). Each wrapper is a permanent patch of
the process (:data:`llava_getok.patching.PROCESS`): LLaVA does not run on the current stack without it, so
``unregister()`` leaves it and says so.

Fix 3 must run before ``llava.train`` is imported; nothing here imports ``llava.train`` before it.
"""
from __future__ import annotations

import importlib.util
import inspect
from dataclasses import dataclass
from typing import Callable

from ..patching import PROCESS

_APPLIED: dict[str, bool] = {}  # fix name -> whether it was needed (and so applied)


@dataclass(frozen=True)
class Fix:
    name: str
    symptom: str
    needed: Callable[[], bool]
    apply: Callable[[], None]


def _llava_causal_lms():
    """LLaVA's LLaMA-family causal LMs (same forward/generate code); MPT has its own and is left alone."""
    from llava.model.language_model.llava_llama import LlavaLlamaForCausalLM
    from llava.model.language_model.llava_mistral import LlavaMistralForCausalLM

    return (LlavaLlamaForCausalLM, LlavaMistralForCausalLM)


def _wrap(owner, attr, make, tag="compat"):
    """Replace ``owner.attr`` by ``make(original)``, marking it with ``tag`` so a second call is a no-op."""
    original = inspect.getattr_static(owner, attr) if inspect.isclass(owner) else getattr(owner, attr)
    func = original.__func__ if isinstance(original, (classmethod, staticmethod)) else original
    while func is not None:  # look through earlier wrappers for this tag
        if tag in getattr(func, "__getok_tags__", ()):
            return
        func = getattr(func, "__getok_original__", None)
    func = original.__func__ if isinstance(original, (classmethod, staticmethod)) else original
    new = make(func)
    for name in ("__module__", "__name__", "__qualname__", "__doc__"):
        setattr(new, name, getattr(func, name, None))
    # Not __wrapped__: inspect.signature would follow it, and fix 1 needs generate() to see the new signature.
    new.__getok_original__ = func
    new.__getok_tags__ = (tag,)
    PROCESS.replace(owner, attr, classmethod(new) if isinstance(original, classmethod) else new, why=f"compat: {tag}",
                    permanent=True)


# 1 -- cache_position ----------------------------------------------------------------------------------

def _needs_cache_position():
    from transformers import LlamaForCausalLM

    return "cache_position" in inspect.signature(LlamaForCausalLM.forward).parameters and any(
        "cache_position" not in inspect.signature(c.forward).parameters for c in _llava_causal_lms()
    )


def _fix_cache_position():
    def make(original):
        # An explicit signature (no **kwargs): generate() inspects it to decide which inputs to pass.
        def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                    inputs_embeds=None, labels=None, use_cache=None, output_attentions=None,
                    output_hidden_states=None, images=None, image_sizes=None, return_dict=None,
                    cache_position=None):
            # LLaVA rebuilds positions itself from the attention mask; the cache position is derived again
            # by the LLaMA forward from past_key_values, so dropping it is exact.
            return original(self, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            past_key_values=past_key_values, inputs_embeds=inputs_embeds, labels=labels,
                            use_cache=use_cache, output_attentions=output_attentions,
                            output_hidden_states=output_hidden_states, images=images, image_sizes=image_sizes,
                            return_dict=return_dict)
        return forward

    for cls in _llava_causal_lms():
        if "cache_position" not in inspect.signature(cls.forward).parameters:
            _wrap(cls, "forward", make)


# 2 -- bare load_in_4bit with quantization_config -----------------------------------------------------

def _needs_bnb_kwargs():
    from transformers import modeling_utils

    return "as a kwarg when passing" in inspect.getsource(modeling_utils.PreTrainedModel.from_pretrained)


def _fix_bnb_kwargs():
    def make(original):
        def from_pretrained(cls, *args, **kwargs):
            if kwargs.get("quantization_config") is not None:
                # LLaVA passes both; the config says the same thing, the bare flags are what newer versions refuse.
                kwargs.pop("load_in_4bit", None)
                kwargs.pop("load_in_8bit", None)
            return original(cls, *args, **kwargs)
        return from_pretrained

    for cls in _llava_causal_lms():  # set on the LLaVA classes only, never on PreTrainedModel
        _wrap(cls, "from_pretrained", make)


# 2b -- LLaVA's QLoRA quantises lm_head (ours) ------------------------------------------------------------

def _needs_head_unquantised():
    import llava.train.train as train_mod

    return 'llm_int8_skip_modules=["mm_projector"]' in inspect.getsource(train_mod.train)


def _fix_head_unquantised():
    def make(original):
        def from_pretrained(cls, *args, **kwargs):
            q = kwargs.get("quantization_config")
            skip = getattr(q, "llm_int8_skip_modules", None)
            if skip is not None and "lm_head" not in skip:
                # transformers' own default keeps lm_head in full precision; LLaVA's explicit list drops that,
                # and a 4-bit head can neither be resized for new tokens nor have rows trained.
                q.llm_int8_skip_modules = list(skip) + ["lm_head"]
            return original(cls, *args, **kwargs)
        return from_pretrained

    for cls in _llava_causal_lms():
        _wrap(cls, "from_pretrained", make, tag="head_unquantised")


# 3 -- ALL_LAYERNORM_LAYERS moved -------------------------------------------------------------------------

def _needs_layernorm_name():
    import transformers.trainer

    return not hasattr(transformers.trainer, "ALL_LAYERNORM_LAYERS")


def _fix_layernorm_name():
    import transformers.trainer
    from transformers.pytorch_utils import ALL_LAYERNORM_LAYERS

    PROCESS.replace(transformers.trainer, "ALL_LAYERNORM_LAYERS", ALL_LAYERNORM_LAYERS, why="compat", permanent=True)


# 4 -- _get_train_sampler(dataset) ------------------------------------------------------------------------

def _needs_sampler_arg():
    from transformers import Trainer

    return len(inspect.signature(Trainer._get_train_sampler).parameters) > 1


def _fix_sampler_arg():
    from llava.train.llava_trainer import LLaVATrainer

    def make(original):
        def _get_train_sampler(self, train_dataset=None):
            # LLaVA's version reads self.train_dataset, which is what the Trainer passes for training.
            return original(self)
        return _get_train_sampler

    _wrap(LLaVATrainer, "_get_train_sampler", make)


# 5 -- maybe_zero_3 imports deepspeed even without it --------------------------------------------------

def _needs_lazy_deepspeed():
    return importlib.util.find_spec("deepspeed") is None


def _fix_lazy_deepspeed():
    import llava.train.llava_trainer as trainer_mod
    import llava.train.train as train_mod

    def make(original):
        def maybe_zero_3(param, ignore_status=False, name=None):
            if hasattr(param, "ds_id"):  # only ZeRO-3 parameters need deepspeed
                return original(param, ignore_status=ignore_status, name=name)
            return param.detach().cpu().clone()
        return maybe_zero_3

    _wrap(train_mod, "maybe_zero_3", make)
    _wrap(trainer_mod, "maybe_zero_3", make)


# 6 -- torch.cuda.synchronize without CUDA -------------------------------------------------------------

def _needs_cuda_sync():
    import torch

    return not torch.cuda.is_available()


def _fix_cuda_sync():
    import torch

    import llava.train.train as train_mod

    def make(original):
        def safe_save_model_for_hf_trainer(trainer, output_dir):
            if trainer.deepspeed and not getattr(trainer.args, "tune_mm_mlp_adapter", False) \
                    and not torch.cuda.is_available():
                trainer.save_model(output_dir)  # what LLaVA does after its unconditional cuda sync
                return
            return original(trainer=trainer, output_dir=output_dir)
        return safe_save_model_for_hf_trainer

    _wrap(train_mod, "safe_save_model_for_hf_trainer", make)


# 7 -- text-only generate(input_ids=...) ------------------------------------------------------------------

def _needs_generate_input_ids():
    return any("input_ids" not in inspect.signature(c.generate).parameters for c in _llava_causal_lms())


def _fix_generate_input_ids():
    def make(original):
        def generate(self, inputs=None, images=None, image_sizes=None, **kwargs):
            if inputs is None and "input_ids" in kwargs:
                inputs = kwargs.pop("input_ids")
            return original(self, inputs, images=images, image_sizes=image_sizes, **kwargs)
        return generate

    for cls in _llava_causal_lms():
        _wrap(cls, "generate", make)


# 8 -- _save_checkpoint(model, trial, metrics) (ours: found when saving intermediate checkpoints) ---------

def _needs_checkpoint_metrics():
    from transformers import Trainer

    return "metrics" not in inspect.signature(Trainer._save_checkpoint).parameters


def _fix_checkpoint_metrics():
    from transformers import Trainer

    from llava.train.llava_trainer import LLaVATrainer

    def make(original):
        def _save_checkpoint(self, model, trial, metrics=None):
            if getattr(self.args, "tune_mm_mlp_adapter", False):
                return original(self, model, trial, metrics)  # LLaVA's own projector-only save
            return Trainer._save_checkpoint(self, model, trial)
        return _save_checkpoint

    _wrap(LLaVATrainer, "_save_checkpoint", make)


# 9 -- empty optimiser groups under ZeRO-3 (ours: LoRA + --mm_projector_lr + ZeRO-3) -------------------------

def _needs_empty_groups():
    return importlib.util.find_spec("deepspeed") is not None


def _fix_empty_groups():
    from llava.train.llava_trainer import LLaVATrainer

    def make(original):
        def create_optimizer(self):
            optimizer = original(self)
            # LLaVA builds 4 groups with --mm_projector_lr, one empty under LoRA (no trainable non-projector
            # bias); DeepSpeed's ZeRO-3 optimiser drops empty groups and the LR scheduler, built for 4,
            # then fails with "zip() argument 2 is longer than argument 1".
            optimizer.param_groups[:] = [g for g in optimizer.param_groups if g["params"]]
            return optimizer
        return create_optimizer

    _wrap(LLaVATrainer, "create_optimizer", make)


# 10 -- images in another dtype than the projector (ours: LLaVA's serve code on a CPU) ------------------------

def _needs_image_dtype():
    from llava.model.llava_arch import LlavaMetaForCausalLM
    from llava.model.multimodal_encoder.clip_encoder import CLIPVisionTower

    # The tower runs in its own dtype but hands its features back in the images' dtype, and encode_images applies
    # the projector to them as they are: images in another dtype than the projector's weights stop there.
    return ("images.dtype" in inspect.getsource(CLIPVisionTower.forward)
            and "dtype" not in inspect.getsource(LlavaMetaForCausalLM.encode_images))


def _fix_image_dtype():
    import torch

    def make(original):
        def encode_images(self, images):
            # serve.cli and model_worker cast the images to float16 whatever the model's dtype is (float32 on a
            # CPU): give them the projector's dtype. The tower casts them to its own dtype first either way, so
            # its input is the same; a model in the images' dtype (LLaVA on a GPU) is untouched, and so is a
            # forward under autocast (training with --bf16 / --fp16), where the matmuls take one dtype anyway.
            weight = next(self.get_model().mm_projector.parameters(), None)
            if weight is not None and weight.is_floating_point() and images.dtype != weight.dtype \
                    and not torch.is_autocast_enabled(images.device.type):
                images = images.to(weight.dtype)
            return original(self, images)
        return encode_images

    for cls in _llava_causal_lms():
        _wrap(cls, "encode_images", make)


FIXES = (  # layernorm_name first: the later ones import llava.train
    Fix("layernorm_name", "cannot import name 'ALL_LAYERNORM_LAYERS' from 'transformers.trainer'",
        _needs_layernorm_name, _fix_layernorm_name),
    Fix("cache_position", "forward() got an unexpected keyword argument 'cache_position'",
        _needs_cache_position, _fix_cache_position),
    Fix("bnb_kwargs", "You can't pass load_in_4bit or load_in_8bit as a kwarg when passing quantization_config",
        _needs_bnb_kwargs, _fix_bnb_kwargs),
    Fix("head_unquantised", "RuntimeError: Only Tensors of floating point ... can require gradients (resizing a 4-bit lm_head)",
        _needs_head_unquantised, _fix_head_unquantised),
    Fix("sampler_arg", "_get_train_sampler() takes 1 positional argument but 2 were given",
        _needs_sampler_arg, _fix_sampler_arg),
    Fix("lazy_deepspeed", "No module named 'deepspeed' when saving LoRA/projector weights",
        _needs_lazy_deepspeed, _fix_lazy_deepspeed),
    Fix("cuda_sync", "Torch not compiled with CUDA enabled when saving under ZeRO on CPU",
        _needs_cuda_sync, _fix_cuda_sync),
    Fix("generate_input_ids", "embedding(): argument 'indices' must be Tensor, not NoneType",
        _needs_generate_input_ids, _fix_generate_input_ids),
    Fix("checkpoint_metrics", "_save_checkpoint() takes 3 positional arguments but 4 were given",
        _needs_checkpoint_metrics, _fix_checkpoint_metrics),
    Fix("empty_param_groups", "ValueError: zip() argument 2 is longer than argument 1 (LR scheduler, ZeRO-3)",
        _needs_empty_groups, _fix_empty_groups),
    Fix("image_dtype", "RuntimeError: mat1 and mat2 must have the same dtype, but got Half and Float "
        "(llava.serve.cli / model_worker on a CPU)", _needs_image_dtype, _fix_image_dtype),
)


def apply_compat_fixes(names=None) -> list[str]:
    """Apply every needed fix not applied yet (only ``names`` if given); return the names applied by this
    call. ``names=("layernorm_name",)`` is safe while ``llava.train`` is being imported (patches/)."""
    applied = []
    for fix in FIXES:
        if fix.name in _APPLIED or (names is not None and fix.name not in names):
            continue
        needed = fix.needed()
        if needed:
            start = len(PROCESS.patches)
            fix.apply()
            for patch in PROCESS.patches[start:]:
                patch.why = f"compat fix {fix.name}: {fix.symptom}"
            applied.append(fix.name)
        _APPLIED[fix.name] = needed
    return applied


def applied_fixes() -> list[str]:
    """Names of the fixes applied so far in this process."""
    return [name for name, needed in _APPLIED.items() if needed]
