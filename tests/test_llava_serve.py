"""GETok answers survive the places people talk to LLaVA models through, on a tiny LLaVA trained here until greedy
decoding writes its box: LLaVA's own ``python -m llava.serve.cli`` (run with the plugin registered, the way the
README tells LLaVA users), LLaVA's ``ModelWorker.generate_stream``, transformers' decode with
``skip_special_tokens=True`` (slow and fast tokenizer) and the completions trl's GRPOTrainer hands to the reward
functions. Each keeps the location tokens and parses to the shapes ``llava-getok predict`` gives for the same image
and question. The cli's one turn on a CPU also needs the ``image_dtype`` compat fix (docs/llava-compat.md).
"""
import base64
import contextlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import llava_getok as gt
from llava_getok import formats

REPO = Path(__file__).resolve().parents[1]
CFG = gt.GETokConfig(grid=8)
CONV = "getok_v1"
MAX_NEW = 12  # the box is 6 tokens and the template's space before it: room to spare, bounded


def env():
    return dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
                PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))


@pytest.fixture(scope="module")
def data(tmp_path_factory, shared_data):
    from llava_getok.llava.tiny import make_grounding_data

    return make_grounding_data(tmp_path_factory.mktemp("serve-data"), shared_data / "coco_mini", CFG, n_records=2)


@pytest.fixture(scope="module")
def checkpoint(tiny_llava_dir, data, tmp_path_factory):
    """``python -m llava_getok.train`` (in this process) on two REC records until greedy decoding writes their
    boxes; the folder name holds "llava", as LLaVA's model worker wants it to before it uses an image."""
    from llava_getok import train as entry

    out = tmp_path_factory.mktemp("serve") / "llava-getok-tiny"
    argv = ["--model_name_or_path", str(tiny_llava_dir), "--version", CONV, "--data_path", str(data),
            "--image_folder", str(data.parent / "images"), "--vision_tower", str(tiny_llava_dir / "vision_tower"),
            "--mm_projector_type", "mlp2x_gelu", "--mm_vision_select_layer", "-2", "--mm_use_im_start_end", "False",
            "--mm_use_im_patch_token", "False", "--image_aspect_ratio", "pad", "--getok_grid", str(CFG.grid),
            "--output_dir", str(out), "--max_steps", "24", "--per_device_train_batch_size", "2",
            "--learning_rate", "4e-3", "--lr_scheduler_type", "constant", "--save_strategy", "no",
            "--report_to", "none", "--model_max_length", "256", "--dataloader_num_workers", "0", "--seed", "0",
            "--disable_tqdm", "True", "--use_cpu", "True"]
    saved = sys.argv
    try:
        entry.main(argv)
    finally:
        sys.argv = saved
    return out


@pytest.fixture(scope="module")
def predicted(checkpoint, data, tmp_path_factory):
    """``llava-getok predict`` on the same records, greedy and unconstrained as LLaVA's cli decodes:
    record id -> (raw answer, its shapes)."""
    from llava_getok.predict import main

    out = tmp_path_factory.mktemp("serve-pred") / "preds.jsonl"
    assert main(["--model-path", str(checkpoint), "--data", str(data), "--image-root", str(data.parent / "images"),
                 "--output", str(out), "--no-constrained", "--conv-mode", CONV, "--max-new-tokens", str(MAX_NEW),
                 "--device", "cpu"]) == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    result = {x["id"]: (x["text"], shapes(x["text"])) for x in lines}
    assert all(s and s[0][0] == "box" for _, s in result.values()), result  # trained: each answer is a box
    return result


def shapes(text):
    return [(s.kind, s.points) for s in formats.parse(text, CFG).shapes]


def question(record):
    return record["conversations"][0]["value"].replace("<image>\n", "")


def test_llava_serve_cli_prints_the_box_predict_gives(checkpoint, data, predicted):
    """One turn of LLaVA's own cli, typed on stdin, on a CPU (float16 images on a float32 model: image_dtype)."""
    record = json.loads(data.read_text())[0]
    cmd = [sys.executable, "-m", "llava_getok.llava.run", "llava.serve.cli", "--model-path", str(checkpoint),
           "--image-file", str(data.parent / "images" / record["image"]), "--device", "cpu", "--conv-mode", CONV,
           "--temperature", "0", "--max-new-tokens", str(MAX_NEW)]
    proc = subprocess.run(cmd, input=question(record) + "\n", capture_output=True, text=True, timeout=300, env=env(),
                          cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    answer = proc.stdout.split("ASSISTANT:", 1)[1].split("\nUSER:", 1)[0]
    assert formats.LOCATION_TOKEN_RE.search(answer), proc.stdout
    assert shapes(answer) == predicted[record["id"]][1], (answer, predicted[record["id"]][0])


@contextlib.contextmanager
def process_state_kept(folder):
    """Importing ``llava.serve.model_worker`` runs LLaVA's ``build_logger`` for the worker process: sys.stdout and
    sys.stderr become loggers, the root handler's format changes and a log file in the working directory joins every
    logger. Inside this block the file goes to ``folder``; afterwards the test process has its own back."""
    root = logging.getLogger()
    streams, cwd, formats_ = (sys.stdout, sys.stderr), os.getcwd(), [(h, h.formatter) for h in root.handlers]
    os.chdir(folder)
    try:
        yield
    finally:
        import llava.utils

        sys.stdout, sys.stderr = streams
        os.chdir(cwd)
        for handler, formatter in formats_:
            handler.setFormatter(formatter)
        if llava.utils.handler is not None:
            for item in list(logging.root.manager.loggerDict.values()) + [root]:
                if isinstance(item, logging.Logger):
                    item.removeHandler(llava.utils.handler)
            llava.utils.handler.close()


def test_llava_model_worker_streams_the_box_predict_gives(checkpoint, data, predicted, tmp_path):
    """LLaVA's ModelWorker, built in this process without a controller (no_register), streams the answer with the
    GETok tokens, piece by piece, from a request as LLaVA's web server sends it (prompt, base64 image)."""
    from llava.conversation import conv_templates

    gt.register()
    with process_state_kept(tmp_path):
        from llava.serve.model_worker import ModelWorker

        worker = ModelWorker("http://127.0.0.1:9", "http://127.0.0.1:9", "test", True, str(checkpoint), None, None,
                             False, False, "cpu")
        record = json.loads(data.read_text())[1]
        conv = conv_templates[CONV].copy()
        conv.append_message(conv.roles[0], "<image>\n" + question(record))
        conv.append_message(conv.roles[1], None)
        image = base64.b64encode((data.parent / "images" / record["image"]).read_bytes()).decode()
        params = {"prompt": conv.get_prompt(), "images": [image], "temperature": 0, "max_new_tokens": MAX_NEW,
                  "stop": conv.sep2}
        chunks = [json.loads(c[:-1]) for c in worker.generate_stream(params)]
    texts = [c["text"] for c in chunks]
    assert all(c["error_code"] == 0 for c in chunks) and len(texts) > 1  # streamed
    answer = texts[-1][len(params["prompt"]):]
    assert formats.LOCATION_TOKEN_RE.search(answer), texts[-1]
    assert shapes(answer) == predicted[record["id"]][1], (answer, predicted[record["id"]][0])


def test_transformers_decode_skipping_special_tokens_keeps_the_box(checkpoint, data, predicted):
    """The greedy answer's ids, decoded as most harnesses decode (skip_special_tokens=True), slow and fast."""
    from transformers import AutoTokenizer

    from llava_getok.llava.builder import load_getok_checkpoint

    gt.register()
    tokenizer, model, processor, _ = load_getok_checkpoint(checkpoint)
    fast = AutoTokenizer.from_pretrained(checkpoint, use_fast=True)
    from llava_getok.llava import inputs

    for record in json.loads(data.read_text()):
        prompt = inputs.render_prompt(record["conversations"][:1], CONV)
        ids = torch.tensor([inputs.prompt_ids(prompt, tokenizer)])
        image = inputs.image_tensor(data.parent / "images" / record["image"], processor, model.config)
        with torch.inference_mode():
            out = model.generate(ids, images=image[None], do_sample=False, max_new_tokens=MAX_NEW)[0].tolist()
        for tok in (tokenizer, fast):
            text = tok.decode(out, skip_special_tokens=True)
            assert shapes(text) == predicted[record["id"]][1], (type(tok).__name__, text)


def test_grpo_reward_functions_get_the_completion_text_with_its_tokens(checkpoint, data, tmp_path):
    """trl decodes the completions it hands to the reward functions with skip_special_tokens=True: the text keeps
    the location tokens and parses to what the completion's ids parse to."""
    from llava_getok.rl.run import RLArgs, build_trainer

    args = RLArgs(model_path=str(checkpoint), data=str(data), image_folder=str(data.parent / "images"),
                  output_dir=str(tmp_path), conv_mode=CONV, num_generations=2, max_steps=1, max_new_tokens=8,
                  learning_rate=1e-4, beta=0.0, lora_r=4, lora_alpha=8, lora_dropout=0.0, save_steps=1000,
                  device="cpu", bf16=False, gradient_checkpointing=False, seed=0, constrained=True,
                  constrain_only="box")
    trainer = build_trainer(args)
    seen = []
    reward = trainer.reward_funcs[0]

    def recording(*a, completions, completion_ids, **kw):
        seen.extend(zip(completions, completion_ids))
        return reward(*a, completions=completions, completion_ids=completion_ids, **kw)

    trainer.reward_funcs[0] = recording
    trainer.train()
    sidecar_ids = dict(zip(trainer.processing_class.convert_tokens_to_ids(list(CFG.tokens())), CFG.tokens()))
    assert len(seen) == 2  # one prompt, 2 generations
    for text, ids in seen:
        assert formats.LOCATION_TOKEN_RE.search(text), text
        by_ids = [(s.kind, s.points) for s in formats.parse_ids(ids, sidecar_ids, CFG).shapes]
        assert by_ids and shapes(text) == by_ids, (text, ids)


def test_image_dtype_fix_lets_float16_images_reach_a_float32_model(checkpoint, data):
    """What serve.cli and model_worker do on a CPU: images cast to float16, the builder's model in float32."""
    from llava.mm_utils import process_images
    from PIL import Image

    from llava_getok.llava.builder import load_getok_checkpoint
    from llava_getok.llava.compat import applied_fixes

    gt.register()
    assert "image_dtype" in applied_fixes()
    _, model, processor, _ = load_getok_checkpoint(checkpoint)
    record = json.loads(data.read_text())[0]
    image = process_images([Image.open(data.parent / "images" / record["image"]).convert("RGB")], processor,
                           model.config)
    with torch.inference_mode():
        half = model.encode_images(image.to(torch.float16))
        full = model.encode_images(image.float())
        with pytest.raises(RuntimeError, match="mat1 and mat2 must have the same dtype"):  # LLaVA's own
            type(model).encode_images.__getok_original__(model, image.to(torch.float16))
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, full, atol=2e-3, rtol=0)  # the same features, up to float16 pixels
