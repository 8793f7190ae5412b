"""Several training processes on a machine without a GPU: the recipes' smoke test on a CPU.

transformers and accelerate choose the distributed set-up from the device, and on a CPU they get some of it
wrong (transformers 4.57, accelerate 1.15):

- every rank's device is ``cpu:0`` (accelerate gives each rank "its" device index), and transformers' weight
  loader takes a device index for an accelerator: 4-bit loading (QLoRA) fails with "Cannot access accelerator
  device when none is available";
- launched by ``deepspeed --num_gpus N``, accelerate finds no communication backend for the device and reports
  one process while DeepSpeed runs N: transformers stops in its batch check ("train_batch_size is not equal to
  micro_batch_per_gpu * gradient_acc_step * world_size 2 != 2 * 1 * 2");
- with ``--use_cpu True`` accelerate drops the DeepSpeed plugin without a word (``AcceleratorState``: DeepSpeed
  only ``if ... and not cpu``): plain DDP trains and the ZeRO config is ignored;
- ``--bf16 True`` without ``--use_cpu`` is refused ("Your setup doesn't support bf16/gpu"), though DeepSpeed's
  CPU accelerator trains in bf16.

:func:`enable` corrects the first, and with ``deepspeed`` the second and the fourth, at their source; the entry
point (``python -m llava_getok.train --use_cpu True``) hides ``--use_cpu`` from transformers under DeepSpeed,
which is the third. So ``torchrun ... --ddp_backend gloo`` runs data parallel and ``deepspeed --num_gpus N ...
--deepspeed zero3.json`` runs ZeRO with N ranks over gloo, QLoRA included. Only for machines without a GPU.
"""
from __future__ import annotations

import os

from ..patching import PROCESS

_DONE: set[str] = set()
WHY = "training ranks on a CPU (llava_getok.training.cpu_ranks)"


def enable(deepspeed: bool = False) -> None:
    """Let accelerate and transformers run training ranks (DeepSpeed's too, with ``deepspeed``) on a CPU.
    Idempotent; refuses a machine with CUDA."""
    import torch

    if torch.cuda.is_available():
        raise RuntimeError("training ranks on the CPU are for machines without a GPU")
    import accelerate.state

    if "device" not in _DONE:
        set_device = accelerate.state.PartialState.set_device

        def plain_cpu(self):
            set_device(self)
            if self.device is not None and self.device.type == "cpu":
                self.device = torch.device("cpu")  # not cpu:N: an index means an accelerator to the loaders

        PROCESS.replace(accelerate.state.PartialState, "set_device", plain_cpu, why=WHY)
        _DONE.add("device")
    if deepspeed and "deepspeed" not in _DONE:
        import transformers.training_args
        from accelerate.utils import DistributedType

        prepare_backend = accelerate.state.PartialState._prepare_backend

        def _prepare_backend(self, cpu=False, sagemaker_dp=False, backend=None):
            found, kind = prepare_backend(self, cpu, sagemaker_dp, backend)
            deepspeed_rank = (os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
                              and int(os.environ.get("LOCAL_RANK", -1)) != -1)
            if found is None and not cpu and deepspeed_rank:
                # accelerate then initialises DeepSpeed's communication with this backend and counts the ranks
                return "gloo", DistributedType.MULTI_CPU
            return found, kind

        def bf16_available() -> bool:
            from deepspeed.accelerator import get_accelerator

            return bool(get_accelerator().is_bf16_supported())

        PROCESS.replace(accelerate.state.PartialState, "_prepare_backend", _prepare_backend, why=WHY)
        PROCESS.replace(transformers.training_args, "is_torch_bf16_gpu_available", bf16_available, why=WHY)
        _DONE.add("deepspeed")
