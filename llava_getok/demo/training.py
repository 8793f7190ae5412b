"""The demo's training run: ``python -m llava_getok.train`` with the demo's arguments, run as a child process whose
logged losses drive a progress bar."""
from __future__ import annotations

import ast
import json
import subprocess
from pathlib import Path

from .. import quiet

WARMUP_STEPS = 50  # linear warm-up before every schedule but constant
# transformers' lr_scheduler_type values that need nothing but the step counts (warmup_stable_decay: --decay-steps)
SCHEDULES = ("cosine", "linear", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial",
             "inverse_sqrt", "warmup_stable_decay")


def log_every(steps: int) -> int:
    """Training steps between two logged losses: 50, or a tenth of a short run."""
    return max(1, min(50, steps // 10))


def run_training(cmd: list[str], env: dict, steps: int, every: int) -> int:
    """Run the training command and return its exit status. Its logged losses (the Trainer's ``{'loss': ...}``
    lines, one every ``every`` steps) drive a progress bar with the loss and the time left; every other line
    is passed on, except the known noise of :mod:`llava_getok.quiet`."""
    from tqdm import tqdm

    env = {**env, "PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": quiet.python_warnings_option()}
    lines = quiet.LineFilter()
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc, \
            tqdm(total=steps, desc="training", unit="step", dynamic_ncols=True) as bar:
        for line in proc.stdout:
            logs = trainer_log(line)
            if logs is None:
                if lines.keep(line):
                    bar.write(line.rstrip("\n"))
            elif "loss" in logs:
                bar.update(min(every, steps - bar.n))
                bar.set_postfix(loss=f"{logs['loss']:.3f}")
            elif "train_runtime" in logs:
                bar.update(steps - bar.n)
    return proc.returncode


def trainer_log(line: str) -> dict | None:
    """The dict of a Trainer log line (``{'loss': 9.33, 'learning_rate': ..., 'epoch': 0.5}``), else None."""
    if not (line.startswith("{'") and line.rstrip().endswith("}")):
        return None
    try:
        logs = ast.literal_eval(line.strip())
    except (ValueError, SyntaxError):
        return None
    return logs if isinstance(logs, dict) else None


def train_command(args: list[str], processes: int, module: str = "llava_getok.train") -> list[str]:
    """The command that trains with ``args``: ``python -m MODULE`` (``llava_getok.train``, or the transformers-native
    backend's ``llava_getok.hf.train``) in one process, or under torchrun on ``processes`` CPU ranks (data parallel
    over gloo, each rank its share of every batch)."""
    import sys

    if processes == 1:
        return [sys.executable, "-m", module, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port",
            str(free_port()), "-m", module, *args, "--ddp_backend", "gloo"]


def free_port() -> int:
    import socket

    with socket.socket() as sock:  # a fixed port collides with any other run on the machine
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train_args(model_dir: Path, data_json: Path, image_root: Path, ckpt: Path, a,
               file_order: bool = False) -> list[str]:
    """``python -m llava_getok.train`` arguments; ``file_order``: ``data_json`` is a curriculum, trained in order.
    With ``a.processes`` > 1 each process takes ``a.batch / a.processes`` records of every batch and prepares them
    itself; in one process a data-loader worker prepares batches beside the training thread."""
    per_process = a.batch // a.processes
    workers = "1" if a.processes == 1 and a.threads == 1 else "0"
    return [
        "--model_name_or_path", str(model_dir), "--version", a.template,
        "--data_path", str(data_json), "--image_folder", str(image_root),
        "--vision_tower", str(model_dir / "vision_tower"), "--mm_projector_type", "mlp2x_gelu",
        "--mm_vision_select_layer", "-1", "--mm_use_im_start_end", "False", "--mm_use_im_patch_token", "False",
        "--image_aspect_ratio", "pad", "--unfreeze_mm_vision_tower", "True",
        "--getok_grid", str(a.grid), "--getok_rounds", str(a.rounds), "--getok_rows", a.rows, "--getok_sigma", str(a.sigma),
        "--output_dir", str(ckpt), "--max_steps", str(a.steps), "--per_device_train_batch_size", str(per_process),
        "--learning_rate", str(a.lr), "--lr_scheduler_type", a.schedule, "--warmup_steps", str(WARMUP_STEPS),
        *(["--lr_scheduler_kwargs", json.dumps({"num_decay_steps": a.decay_steps or a.steps // 4})]
          if a.schedule == "warmup_stable_decay" else []),
        "--max_grad_norm", str(a.max_grad_norm), "--weight_decay", "0",
        *(["--save_strategy", "steps", "--save_steps", str(a.eval_every), "--save_only_model", "True"]
          if a.eval_every else ["--save_strategy", "no"]), "--logging_steps", str(log_every(a.steps)), "--report_to", "none",
        "--disable_tqdm", "True",  # the demo shows its own bar from the logged losses (run_training)
        "--model_max_length", "256", "--dataloader_num_workers", workers, "--seed", str(a.seed),
        "--use_cpu", "True", "--group_by_modality_length", "False",
        # LLaVA's preprocessing check on 1000 records spread over the file (all 28,000 distinct ones: ~2.5 min
        # of the slow tokenizer, for records that one converter wrote alike)
        "--getok_check_data", "1000",
        *(["--getok_data_order", "file"] if file_order else []),
    ]
