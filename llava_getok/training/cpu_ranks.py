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

import argparse
import os

from ..options import truth
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


def _flag(argv, name, kind=str, default=None):
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument(f"--{name}", type=kind, nargs="?", const=True, default=default)
    return p.parse_known_args(argv)


def launch_argv(argv: list[str]) -> list[str]:
    """An entry point's arguments (``python -m llava_getok.train`` and ``llava_getok.hf.train``) made ready for CPU
    ranks: with ``--use_cpu True``, :func:`enable` (DeepSpeed's too under ``--deepspeed``), and ``argv`` returned
    without ``--use_cpu`` under ``--deepspeed`` (it would make accelerate drop DeepSpeed silently); else ``argv``."""
    ns, others = _flag(argv, "use_cpu", truth, False)
    if not ns.use_cpu:
        return argv
    import torch

    deepspeed = bool(_flag(argv, "deepspeed")[0].deepspeed)
    if torch.cuda.is_available():
        if deepspeed:
            raise SystemExit("--use_cpu True with --deepspeed: DeepSpeed on CPU ranks is the smoke test for machines "
                             "without a GPU; on this one drop --use_cpu (or --deepspeed)")
        return argv
    enable(deepspeed=deepspeed)
    return others if deepspeed else argv


def close_process_group() -> None:
    """Shut the distributed process group down before the interpreter does: a ZeRO-3 run on 2 CPU ranks (gloo) once
    died at exit with "terminate called without an active exception" (exit 250) after it had saved everything,
    its communication threads still running; PyTorch asks for destroy_process_group() at the end of a run."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
