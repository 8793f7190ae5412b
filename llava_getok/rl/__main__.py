"""``python -m llava_getok.rl``: GRPO for a GETok checkpoint, LLaVA or transformers-native (Qwen2.5-VL, llava-hf: the
checkpoint's sidecar says; see llava_getok.rl.run.RLArgs).

    python -m llava_getok.rl --model-path SFT_CKPT --data rec_train.json --image-folder coco/ \\
        --output-dir runs/grpo-grid --stage grid [--num-generations 8 --beta 0.04 --learning-rate 1e-5 ...]
    python -m llava_getok.rl --model-path runs/grpo-grid --data refine_train.json --image-folder coco/ \\
        --output-dir runs/grpo-refine --stage refine
"""
from __future__ import annotations

import argparse
import sys

from ..options import add_flags, from_flags
from ..training.cpu_ranks import close_process_group
from .run import RLArgs, run


def parser() -> argparse.ArgumentParser:
    """The flags of :class:`RLArgs`, one per field (``--model-path``, ``--lora`` / ``--no-lora``, ...)."""
    p = argparse.ArgumentParser(prog="python -m llava_getok.rl", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(p, RLArgs, dash=True, switches=True)
    return p


def main(argv=None) -> int:
    ns = parser().parse_args(argv)
    try:
        args = RLArgs(**from_flags(ns, RLArgs))
        trainer = run(args)
    except (ValueError, FileNotFoundError) as e:  # bad arguments or data: say what, not where in the stack
        print(f"error: {e}", file=sys.stderr)
        return 2
    history = [h for h in trainer.state.log_history if "reward" in h]
    if history and trainer.accelerator.is_main_process:
        last = history[-1]
        print(f"[grpo] {len(history)} logged steps on {trainer.accelerator.num_processes} process(es); last reward "
              f"{last['reward']:.4f}, zero-variance groups {last.get('frac_reward_zero_std', float('nan')):.2f}; "
              f"saved {args.output_dir}")
    close_process_group()  # gloo's threads outliving the interpreter abort the rank at exit, after its saves
    return 0


if __name__ == "__main__":
    sys.exit(main())
