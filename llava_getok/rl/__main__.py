"""``python -m llava_getok.rl``: GRPO for a GETok LLaVA checkpoint (see llava_getok.rl.run.RLArgs).

    python -m llava_getok.rl --model-path SFT_CKPT --data rec_train.json --image-folder coco/ \\
        --output-dir runs/grpo-grid --stage grid [--num-generations 8 --beta 0.04 --learning-rate 1e-5 ...]
    python -m llava_getok.rl --model-path runs/grpo-grid --data refine_train.json --image-folder coco/ \\
        --output-dir runs/grpo-refine --stage refine
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import MISSING, fields

from .run import RLArgs, run


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m llava_getok.rl", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(RLArgs):
        flag = "--" + f.name.replace("_", "-")
        help_ = f.metadata.get("help", "")
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        if "bool" in kind:
            default = None if f.default is MISSING else f.default
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default,
                           help=f"{help_} (default: {default})")
            continue
        conv = int if kind.startswith("int") else float if kind.startswith("float") else str
        if f.default is MISSING:
            p.add_argument(flag, dest=f.name, type=conv, required=True, help=help_)
        else:
            p.add_argument(flag, dest=f.name, type=conv, default=f.default, help=f"{help_} (default: {f.default})")
    return p


def main(argv=None) -> int:
    ns = parser().parse_args(argv)
    try:
        args = RLArgs(**vars(ns))
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
