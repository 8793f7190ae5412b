"""The recipes as users run them, on a CPU with two processes: the shipped scripts as files (``DEVICE=cpu``:
DeepSpeed ZeRO-3 full fine-tuning, ZeRO-3 LoRA, ZeRO-2 QLoRA 4-bit, GRPO through accelerate; Qwen2.5-VL's LoRA under
ZeRO-2 and its GRPO), and data parallel
through torchrun, all in bf16 with gradient checkpointing and the box-token loss on, on the tiny model that
``llava-getok tiny-model`` writes. Each run: it trains, both ranks hold the same GETok rows (the trainer compares
them at every save and says so), and the checkpoint loads with LLaVA's builder and generates.

Cost on 2 cores: ~20-30 s a run (two processes importing torch, transformers and DeepSpeed)."""
import json
import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SAME_ROWS = "identical on all 2 ranks"


def free_port() -> str:
    with socket.socket() as sock:  # a fixed port collides with any other run on the machine
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def user_env(**extra) -> dict:
    """The environment of a user whose virtualenv is active."""
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run(cmd, env, timeout=500):
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd[:3]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """``eval "$(llava-getok tiny-model --out DIR)"``: the recipes' environment for a tiny model and data."""
    out = tmp_path_factory.mktemp("tiny")
    cli = Path(sys.executable).parent / "llava-getok"
    proc = run([str(cli), "tiny-model", "--out", str(out), "--grid", "8", "--images", "8"], user_env())
    env = {}
    for line in proc.stdout.splitlines():
        assert line.startswith("export "), f"stdout must hold only the environment, got {line!r}"
        key, value = line[len("export "):].split("=", 1)
        env[key] = shlex.split(value)[0] if value != "''" else ""
    assert set(env) == {"MODEL_BASE", "VISION_TOWER", "PROJECTOR", "DATA_PATH", "IMAGE_FOLDER", "GRID"}
    assert Path(env["DATA_PATH"]).is_file() and Path(env["MODEL_BASE"], "config.json").is_file()
    return env


def script(name, tiny, out, *args, **extra):
    env = user_env(**tiny, DEVICE="cpu", NUM_GPUS=2, OUTPUT_DIR=out, BATCH=2, WORKERS=0, MASTER_PORT=free_port(),
                   **extra)
    return run(["bash", str(REPO / "scripts" / name), *args], env)


def losses(out):
    history = json.loads((Path(out) / "trainer_state.json").read_text())["log_history"]
    return [h for h in history if "loss" in h]


def loads_and_generates(folder, base=None, **kw):
    """LLaVA's builder (after register) loads the checkpoint with the sidecar's token ids, and it generates."""
    import llava_getok as gt

    gt.register()
    from llava.model.builder import load_pretrained_model

    sidecar = json.loads((Path(folder) / "getok_config.json").read_text())
    tok, model, _, _ = load_pretrained_model(str(folder), base, "any", device="cpu", **kw)
    assert tok.convert_tokens_to_ids(sidecar["tokens"]) == sidecar["token_ids"]
    ids = tok("USER: where? ASSISTANT: <box>", return_tensors="pt").input_ids
    out = model.generate(ids, do_sample=False, max_new_tokens=3)
    assert out.shape[-1] == 3
    return sidecar, model


@pytest.fixture(scope="module")
def gpu_check(tmp_path_factory):
    """scripts/gpu_check.sh with DEVICE=cpu: the shipped recipes as files, each on 2 CPU ranks (ZeRO-3 bf16 full
    fine-tuning, QLoRA 4-bit under ZeRO-2, GRPO from the first's checkpoint, predict and eval), 2 training steps each.
    The tests below read what each check left in its folder."""
    out, result = tmp_path_factory.mktemp("gpu_check") / "check", tmp_path_factory.mktemp("result") / "gpu_check.md"
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh")], cwd=REPO, capture_output=True, text=True,
                          env=user_env(DEVICE="cpu", OUT=out, RESULT=result, STEPS=2), timeout=900)
    return out, result, proc


def test_gpu_check_script_runs_its_checks_on_cpu_ranks(gpu_check):
    """scripts/gpu_check.sh is run where a GPU is lent (rarely): DEVICE=cpu runs the same checks here, so a flag or
    path that breaks it breaks this test. Every check passes and the table lists each."""
    out, result, proc = gpu_check
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    table = (out / "gpu_check.md").read_text()
    for name in ("zero3-bf16-full", "qlora4-cuda", "grpo-2-steps", "predict", "qwen-lora-zero2", "qwen-grpo"):
        assert f"| {name} | pass |" in table, proc.stdout[-3000:]
    assert "| flash-attn-2 | skipped" in table and not result.exists()  # a CPU run never stands for a GPU table


def test_finetune_script_zero3_bf16_two_cpu_ranks(gpu_check):
    out = gpu_check[0] / "zero3-bf16-full"
    logs = losses(out)
    assert len(logs) == 2 and all(torch.isfinite(torch.tensor([h["loss"], h["loss_box"]])).all() for h in logs)
    assert SAME_ROWS in (gpu_check[0] / "zero3-bf16-full.log").read_text()
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:  # DeepSpeed's bf16 weights, as on a GPU
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert (out / "checkpoint-2" / "global_step2").is_dir()  # ZeRO's own state: DeepSpeed really ran
    sidecar, _ = loads_and_generates(out)
    assert sidecar["kind"] == "full" and sidecar["format"]["grid"] == 8 and sidecar["settings"]["grid"] == 8


def test_qlora_script_4bit_zero2_two_cpu_ranks(gpu_check):
    out = gpu_check[0] / "qlora4-cuda"
    assert len(losses(out)) == 2 and SAME_ROWS in (gpu_check[0] / "qlora4-cuda.log").read_text()
    base = json.loads((out / "getok_config.json").read_text())["base_model"]
    sidecar, model = loads_and_generates(out, base, load_4bit=True)
    assert sidecar["kind"] == "lora" and "Linear4bit" in {type(m).__name__ for m in model.modules()}


def test_lora_script_zero3_bf16_two_cpu_ranks_resumes_the_getok_rows(tiny, tmp_path):
    out = tmp_path / "out"
    proc = script("finetune_getok_lora.sh", tiny, out, "--max_steps", "2", BITS=16, LORA_R=8, LORA_ALPHA=16)
    assert len(losses(out)) == 2 and SAME_ROWS in proc.stdout
    sidecar, model = loads_and_generates(out, tiny["MODEL_BASE"])
    assert sidecar["kind"] == "lora"
    # resumed under ZeRO-3 and bf16 (LLaVA's train() resumes from checkpoint-*): the GETok row deltas come back
    # from the checkpoint's rows file, and the run goes on from step 2
    from safetensors.torch import load_file

    before = load_file(str(out / "checkpoint-2" / "getok_rows.safetensors"))
    proc = script("finetune_getok_lora.sh", tiny, out, "--max_steps", "3", "--save_steps", "1", BITS=16, LORA_R=8,
                  LORA_ALPHA=16, LR=0)
    assert [h["step"] for h in losses(out)] == [1, 2, 3] and SAME_ROWS in proc.stdout
    after = load_file(str(out / "checkpoint-3" / "getok_rows.safetensors"))  # a step at learning rate 0
    for key in ("input_rows", "output_rows"):
        # equal up to the bf16 rounding of the restored delta (~1e-6); a delta not restored would be off by the two
        # trained steps (~lr = 2e-4 an element)
        torch.testing.assert_close(after[key], before[key], atol=2e-5, rtol=0)


def test_grpo_script_two_cpu_processes(gpu_check):
    out = gpu_check[0] / "grpo"
    assert "[grpo] 2 logged steps on 2 process(es)" in (gpu_check[0] / "grpo-2-steps.log").read_text()
    assert loads_and_generates(out / "grid")[0]["kind"] == "full"  # the merged final save
    assert loads_and_generates(out / "grid" / "checkpoint-1")[0]["kind"] == "lora"


def test_qwen_recipes_two_cpu_ranks(gpu_check):
    """scripts/finetune_getok_qwen.sh (LoRA + GETok rows, bf16, ZeRO-2 through accelerate) and
    scripts/grpo_getok_qwen.sh (both stages, the refine stage on the policy's first answers) on a tiny Qwen2.5-VL, each
    on 2 CPU ranks: the ranks agree on the rows at every save, and every stage's checkpoint loads back on its own."""
    from llava_getok.hf.checkpoint import load_checkpoint
    from llava_getok.training.sidecar import read_sidecar

    out = gpu_check[0]
    sft = out / "qwen-lora-zero2"
    assert len(losses(sft / "checkpoint-2")) == 2 and SAME_ROWS in (out / "qwen-lora-zero2.log").read_text()
    assert (sft / "checkpoint-2" / "global_step2").is_dir()  # ZeRO's own state: DeepSpeed really ran
    sidecar = read_sidecar(sft)
    assert (sidecar.backend, sidecar.model_family, sidecar.kind, sidecar.frame) == ("hf", "qwen2.5-vl", "lora", "orig")
    log = (out / "qwen-grpo.log").read_text()
    assert log.count("[grpo] 2 logged steps on 2 process(es)") == 2 and log.count(SAME_ROWS) >= 2
    base = str(sft)
    for stage in ("grid", "refine"):
        sidecar = read_sidecar(out / "qwen-grpo" / stage)
        assert sidecar.kind == "lora" and sidecar.base_model == base and sidecar.settings["grpo"]["stage"] == stage
        load_checkpoint(out / "qwen-grpo" / stage / "checkpoint-1")  # its rows checked against the saved ones
        base = str(out / "qwen-grpo" / stage)
    lines = (out / "qwen-predictions.jsonl").read_text().splitlines()
    assert lines and all(json.loads(x)["shapes"] for x in lines)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_data_parallel_torchrun_two_cpu_ranks(tiny, tmp_path, lora):
    """DDP with gradient checkpointing: the default non-reentrant checkpoint (the reentrant one raised "Expected
    to mark a variable ready only once" with LoRA); full fine-tuning in fp16 (CPU autocast allows it), LoRA in
    bf16."""
    out = tmp_path / "out"
    t = tiny
    args = ["--model_name_or_path", t["MODEL_BASE"], "--version", "getok_v1", "--data_path", t["DATA_PATH"],
            "--image_folder", t["IMAGE_FOLDER"], "--vision_tower", t["VISION_TOWER"], "--mm_projector_type",
            "mlp2x_gelu", "--image_aspect_ratio", "pad", "--getok_grid", "8", "--output_dir", str(out),
            "--max_steps", "2", "--per_device_train_batch_size", "2", "--save_strategy", "no", "--report_to", "none",
            "--dataloader_num_workers", "0", "--bf16" if lora else "--fp16", "True", "--gradient_checkpointing", "True",
            "--use_cpu", "True", "--ddp_backend", "gloo", "--logging_steps", "1",
            *(["--lora_enable", "True", "--lora_r", "8", "--lora_alpha", "16"] if lora else [])]
    proc = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(),
                "-m", "llava_getok.train", *args], user_env())
    assert len(losses(out)) == 2 and SAME_ROWS in proc.stdout
    sidecar, _ = loads_and_generates(out, t["MODEL_BASE"] if lora else None)
    assert sidecar["kind"] == ("lora" if lora else "full")


def _compare_rows(rank, port, folder):
    import torch.distributed as dist

    from llava_getok.training.rows import check_same_on_all_ranks

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    same = {"input_rows": torch.ones(3, 4), "token_ids": torch.arange(3)}
    assert check_same_on_all_ranks(same, folder) == 2
    apart = {"input_rows": torch.ones(3, 4) + rank * 1e-7, "token_ids": torch.arange(3)}
    try:
        check_same_on_all_ranks(apart, folder)
        result = "no error"
    except RuntimeError as e:
        result = str(e)
    Path(folder, f"rank{rank}.txt").write_text(result)
    dist.destroy_process_group()


def test_rows_that_differ_between_ranks_stop_the_save(tmp_path):
    torch.multiprocessing.spawn(_compare_rows, args=(free_port(), str(tmp_path)), nprocs=2)
    for rank in range(2):
        text = (tmp_path / f"rank{rank}.txt").read_text()
        assert text.startswith("GETok rows differ between ranks") and "ranks [1]" in text
