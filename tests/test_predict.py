"""Prediction runner on the tiny random LLaVA: LLaVA's own generate, batched with left padding, constrained
output that always parses, shapes in pixels of the original image."""
import json
import shutil

import pytest
import torch

from llava_getok.vocab import GETokConfig

PORTRAIT, LANDSCAPE = "000000183709.jpg", "000000034417.jpg"  # 480 x 640 and 500 x 375
CFG = GETokConfig(grid=8, rounds=1)


@pytest.fixture(scope="module")
def tiny_getok(tiny_llava_dir):
    """The tiny LLaVA through LLaVA's builder (hooks registered), GETok tokens added, random new rows."""
    import llava_getok
    from llava_getok.training.tokens import add_getok_tokens, resize_embeddings

    llava_getok.register()
    from llava.model.builder import load_pretrained_model

    torch.manual_seed(0)
    tokenizer, model, processor, _ = load_pretrained_model(str(tiny_llava_dir), None, "tiny-llava", device="cpu")
    add_getok_tokens(tokenizer, CFG)
    resize_embeddings(model, len(tokenizer))
    with torch.no_grad():  # random rows with the spread of the trained ones, so GETok tokens do get sampled
        for w in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
            w[-len(CFG.tokens()):] = torch.randn_like(w[-len(CFG.tokens()):]) * w[:-len(CFG.tokens())].std()
    return tokenizer, model.float().eval(), processor


@pytest.fixture(scope="module")
def records_and_root(shared_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    for name in (PORTRAIT, LANDSCAPE):
        shutil.copy(shared_data / "coco_mini" / "val2017" / name, root / name)
    sizes = {PORTRAIT: [480, 640], LANDSCAPE: [500, 375]}

    def rec(k, image, task):
        return {"id": f"r{k}", "image": image,
                "conversations": [{"from": "human", "value": f"<image>\nWhere is object {k}?"}, {"from": "gpt", "value": ""}],
                "getok": {"task": task, "frame": "pad", "size": sizes[image], "config": CFG.to_dict(), "shapes": []}}

    images = [PORTRAIT, LANDSCAPE, LANDSCAPE, PORTRAIT, LANDSCAPE]
    records = [rec(k, im, "rec") for k, im in enumerate(images)] + [rec(5, PORTRAIT, "point"), rec(6, LANDSCAPE, "res")]
    return records, root, sizes


def test_constrained_generation_always_parses(tiny_getok, records_and_root):
    from llava_getok.predict import Predictor

    tokenizer, model, processor = tiny_getok
    records, root, sizes = records_and_root
    free = Predictor(tokenizer, model, processor, CFG, constrained=True, max_new_tokens=16)
    lines = free.predict(records[3:6], root)  # rec and point records, free answers
    assert all(line["errors"] == [] for line in lines), [(x["text"], x["errors"]) for x in lines]
    shape_only = Predictor(tokenizer, model, processor, CFG, constrained=True, shape_only=True, max_new_tokens=8)
    for batch, kind in ((records[:3], "box"), (records[5:6], "point")):
        for line, r in zip(shape_only.predict(batch, root), batch):
            assert line["errors"] == [] and [s["kind"] for s in line["shapes"]] == [kind], line
            w, h = r["getok"]["size"]
            assert all(0 <= x <= w and 0 <= y <= h for s in line["shapes"] for x, y in s["points"])


def test_batched_left_padded_generation_matches_one_by_one(tiny_getok, records_and_root):
    from llava_getok.predict import Predictor

    tokenizer, model, processor = tiny_getok
    records, root, _ = records_and_root
    p = Predictor(tokenizer, model, processor, CFG, constrained=True, max_new_tokens=6)
    # prompts of different lengths ("object 1" vs "object 10"), so the batch really is padded
    batch = [dict(records[0]), dict(records[1])]
    batch[1]["conversations"] = [{"from": "human", "value": "<image>\nWhere is the object number 10 on the left?"}]
    together = p.predict(batch, root)
    alone = [p.predict([r], root)[0] for r in batch]
    assert [x["text"] for x in together] == [x["text"] for x in alone]


def test_predict_file_writes_one_line_per_record(tiny_getok, records_and_root, tmp_path):
    from llava_getok.predict import Predictor, predict_file

    tokenizer, model, processor = tiny_getok
    records, root, _ = records_and_root
    p = Predictor(tokenizer, model, processor, CFG, constrained=True, shape_only=True, max_new_tokens=8)
    out = tmp_path / "preds.jsonl"
    assert predict_file(p, records[:4], root, out, batch_size=3, progress=False) == 4
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["id"] for x in lines] == ["r0", "r1", "r2", "r3"]
    assert not list(tmp_path.glob(".*tmp"))  # the temp file was renamed
    bad = [dict(records[0], image="missing.jpg")]
    with pytest.raises(FileNotFoundError, match="record r0: field 'image'"):
        predict_file(p, bad, root, tmp_path / "x.jsonl", progress=False)
    assert not (tmp_path / "x.jsonl").exists()


def test_cli_predict_then_eval_then_show(tiny_getok, records_and_root, tmp_path, capsys):
    """The three commands on one converted file: a checkpoint saved with the GETok tokens loads through
    LLaVA's builder, every answer parses, eval scores it, show draws it."""
    from llava_getok.cli import main

    tokenizer, model, processor = tiny_getok
    records, root, _ = records_and_root
    ckpt = tmp_path / "tiny-llava-getok"
    model.save_pretrained(ckpt, safe_serialization=True)
    tokenizer.save_pretrained(ckpt)
    records = json.loads(json.dumps(records))
    for r in records:  # a ground-truth box, so eval has something to score
        r["getok"]["shapes"] = [{"kind": "box", "points": [[10, 20], [200, 300]]}]
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records[:3]))
    preds = tmp_path / "preds.jsonl"
    assert main(["predict", "--model-path", str(ckpt), "--data", str(data), "--image-root", str(root),
                 "--output", str(preds), "--shape-only", "--batch-size", "2", "--max-new-tokens", "8",
                 "--limit", "2", "--device", "cpu"]) == 0
    lines = [json.loads(x) for x in preds.read_text().splitlines()]
    assert len(lines) == 2 and all(x["errors"] == [] and x["shapes"][0]["kind"] == "box" for x in lines)
    assert main(["eval", "--predictions", str(preds), "--annotations", str(data), "--only-predicted", "--no-ceiling"]) == 0
    metrics = json.loads((tmp_path / "preds.metrics.json").read_text())["metrics"]["rec"]["default"]
    assert metrics["n"] == 2 and metrics["unparseable"] == 0
    assert main(["show", "--predictions", str(preds), "--annotations", str(data), "--image-root", str(root),
                 "--output", str(tmp_path / "sheet.png")]) == 0
    assert (tmp_path / "sheet.png").stat().st_size > 0
    for r in records:  # data made for another frame than the model sees: refused, not silently misplaced
        r["getok"]["frame"] = "orig"
    data.write_text(json.dumps(records[:1]))
    assert main(["predict", "--model-path", str(ckpt), "--data", str(data), "--image-root", str(root),
                 "--output", str(tmp_path / "x.jsonl"), "--device", "cpu"]) == 1
    assert "the model sees frame 'pad'" in capsys.readouterr().err


def test_refine_mode_two_turns_always_fit(tiny_getok, records_and_root):
    """Refine mode: a grid-only first answer, then a refinement constrained to its exact structure."""
    from llava_getok.codec import apply_refinement
    from llava_getok.parse import parse
    from llava_getok.predict import Predictor

    tokenizer, model, processor = tiny_getok
    records, root, _ = records_and_root
    cfg = GETokConfig(grid=8, mode="refine")
    batch = json.loads(json.dumps(records[:2]))
    for r in batch:
        r["getok"]["config"] = cfg.to_dict()
    p = Predictor(tokenizer, model, processor, cfg, constrained=True, shape_only=True, max_new_tokens=6)
    for line, r in zip(p.predict(batch, root), batch):
        assert line["errors"] == [], line
        first, second = line["text"].split("\n")
        assert "<off" not in first and second.startswith("<offset><box>") and second.endswith("</offset>")
        refined = apply_refinement(parse(first, cfg).shapes, parse(second, cfg).refinements, cfg)
        expected = [to_px(s, r) for s in refined]
        assert [s["points"] for s in line["shapes"]] == expected


def to_px(shape, record):
    from llava_getok.geometry import boxes_from_frame

    b = boxes_from_frame(list(shape.box), tuple(record["getok"]["size"]), "pad").round(2).reshape(2, 2)
    return b.tolist()


def test_sampled_generation_on_the_tiny_model_always_parses(tiny_getok, records_and_root):
    """LLaVA's generate with sampling at a high temperature, 8 rows: every answer parses by ids."""
    from llava_getok.generation import GETokLogitsProcessor, getok_token_ids
    from llava_getok.llava import inputs
    from llava_getok.parse import parse_ids

    tokenizer, model, processor = tiny_getok
    records, root, _ = records_and_root
    prompt = inputs.render_prompt(records[0]["conversations"][:1], "llava_v1")
    ids = torch.tensor([inputs.prompt_ids(prompt, tokenizer)] * 8)
    images = torch.stack([inputs.image_tensor(root / PORTRAIT, processor, model.config)] * 8)
    proc = GETokLogitsProcessor.from_tokenizer(tokenizer, CFG, max_new_tokens=20)
    torch.manual_seed(0)
    with torch.inference_mode():  # two calls with one processor, no reset: it restarts by itself (GRPO does so)
        out = [model.generate(ids, attention_mask=torch.ones_like(ids), images=images, do_sample=True,
                              temperature=1.5, top_k=0, max_new_tokens=20, logits_processor=[proc],
                              pad_token_id=tokenizer.pad_token_id) for _ in range(2)]
    id_to_token = {v: k for k, v in getok_token_ids(tokenizer, CFG).items()}
    n_shapes = 0
    for row in out[0].tolist() + out[1].tolist():
        row = row[: row.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in row else row
        r = parse_ids(row, id_to_token, CFG)
        assert r.errors == [], tokenizer.decode(row)
        n_shapes += len(r.shapes)
    assert n_shapes >= 8  # the rows did write GETok, not only text


# -- the other location formats ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_bins(tiny_llava_dir):
    """The tiny LLaVA with 16 bin tokens added through the same hook as GETok's, random rows."""
    import llava_getok
    from llava_getok.formats import BinsFormat
    from llava_getok.training.tokens import add_getok_tokens, resize_embeddings

    llava_getok.register()
    from llava.model.builder import load_pretrained_model

    fmt = BinsFormat(bins=16)
    torch.manual_seed(1)
    tokenizer, model, processor, _ = load_pretrained_model(str(tiny_llava_dir), None, "tiny-llava", device="cpu")
    ids = add_getok_tokens(tokenizer, fmt)
    resize_embeddings(model, len(tokenizer))
    with torch.no_grad():
        for w in (model.get_input_embeddings().weight, model.get_output_embeddings().weight):
            w[ids] = torch.randn_like(w[ids]) * w[: min(ids)].std() * 3  # large enough to be sampled
    return tokenizer, model.float().eval(), processor, fmt


def test_bins_rec_answers_are_exactly_four_location_tokens(tiny_bins, records_and_root):
    from llava_getok.predict import Predictor

    tokenizer, model, processor, fmt = tiny_bins
    records, root, _ = records_and_root
    batch = json.loads(json.dumps(records[:3] + records[5:6]))  # three rec records, one point record
    for r in batch:
        r["getok"].pop("config")
        r["getok"]["format"] = fmt.to_dict()
    p = Predictor(tokenizer, model, processor, fmt, constrained=True, shape_only=True, max_new_tokens=8)
    loc = set(tokenizer.convert_tokens_to_ids(list(fmt.tokens())))
    for line, r in zip(p.predict(batch[:3], root) + p.predict(batch[3:], root), batch):
        ids = tokenizer(line["text"], add_special_tokens=False).input_ids
        want = 4 if r["getok"]["task"] == "rec" else 2
        assert len(ids) == want and set(ids) <= loc and line["errors"] == [], line
        assert [s["kind"] for s in line["shapes"]] == ["box" if want == 4 else "point"]
    free = Predictor(tokenizer, model, processor, fmt, constrained=True, max_new_tokens=12)
    lines = free.predict(batch[:3], root)
    assert all(line["errors"] == [] for line in lines), lines  # free text, but every run of locations is a shape


def stock_llava(tiny_llava_dir, folder):
    """The tiny LLaVA as liuhaotian/llava-v1.5-7b is published: no sidecar, no location tokens, a config.json that
    says model_type "llava" and holds only what transformers 4.31 wrote (no rope_theta, attention_dropout, ...)."""
    shutil.copytree(tiny_llava_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    for key in ("attention_bias", "attention_dropout", "head_dim", "mlp_bias", "rope_theta", "dtype",
                "tokenizer_model_max_length", "tokenizer_padding_side", "mm_patch_merge_type"):
        config.pop(key, None)
    config.update(model_type="llava", transformers_version="4.31.0", torch_dtype="float16")
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def test_a_stock_llava_without_a_sidecar_answers_text_and_eval_scores_its_raw_answers(tiny_llava_dir, tmp_path, capsys):
    """The zero-shot recipe on the tiny model: convert with --format text --frame pad, predict with a checkpoint that
    has no sidecar (text is never constrained), eval; a model_vqa-style file (question_id, text) scores the same."""
    from convert_cases import COCO, IMAGES, run_cli

    from llava_getok.cli import main

    model = stock_llava(tiny_llava_dir, tmp_path / "llava-v1.5-tiny")
    data = tmp_path / "val.json"
    rc, _ = run_cli(["coco", "--input", COCO, "--image-root", IMAGES, "--task", "rec", "--format", "text", "--frame",
                     "pad", "--on-error", "skip", "--output", data])
    assert rc == 0
    preds = tmp_path / "preds.jsonl"
    assert main(["predict", "--model-path", str(model), "--data", str(data), "--image-root", str(IMAGES), "--output",
                 str(preds), "--limit", "3", "--max-new-tokens", "12", "--conv-mode", "vicuna_v1", "--device", "cpu"]) == 0
    lines = [json.loads(x) for x in preds.read_text().splitlines()]
    assert len(lines) == 3 and all(x["text"] for x in lines)  # free text from a model without location tokens
    assert main(["eval", "--predictions", str(preds), "--annotations", str(data), "--only-predicted"]) == 0
    out = capsys.readouterr().out
    assert "| text, 2 decimals |" in out
    vqa = tmp_path / "answers.jsonl"  # what LLaVA's llava.eval.model_vqa writes
    vqa.write_text("".join(json.dumps({"question_id": x["id"], "prompt": "", "text": x["text"], "answer_id": "a",
                                       "model_id": "llava-v1.5-tiny", "metadata": {}}) + "\n" for x in lines))
    assert main(["eval", "--predictions", str(vqa), "--annotations", str(data), "--only-predicted"]) == 0
    scores = [json.loads(x) for x in (tmp_path / "preds.scores.jsonl").read_text().splitlines()]
    assert scores == [json.loads(x) for x in (tmp_path / "answers.scores.jsonl").read_text().splitlines()]
