"""`llava-getok demo --quick`: the whole job runs end to end (data, convert, tiny LLaVA, `python -m
llava_getok.train`, constrained prediction, eval, contact sheet) and reports Acc@0.5 beside its chance levels.
Two training steps: this checks the plumbing, not the learning (bench/learning.py measures that)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image


def test_demo_quick_runs_end_to_end(tmp_path, capsys):
    from llava_getok.demo import main
    from llava_getok.demo.data import shapes_records

    out = tmp_path / "demo"
    assert main(["--quick", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "2 process(es) x 1 thread(s)" in printed  # the default: data parallel on two CPU ranks
    summary = json.loads((out / "summary.json").read_text())
    # evaluated on every val record; constrained, shape-only decoding always yields one parseable box
    assert summary["metrics"]["n"] == 4 and summary["metrics"]["unparseable"] == 0
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 4 and all(len(p["shapes"]) == 1 and p["shapes"][0]["kind"] == "box" for p in preds)
    # the reported Acc@0.5 is the share of predicted boxes with IoU >= 0.5 against the drawn shapes' boxes
    from llava_getok.geometry import box_iou

    truth = {r["id"]: r["box"] for r in shapes_records(out / "data")["val"]}
    ious = [float(np.asarray(box_iou(np.asarray([[*p["shapes"][0]["points"][0], *p["shapes"][0]["points"][1]]]),
                                     np.asarray([truth[p["id"].rsplit("-", 1)[0]]], float))).reshape(-1)[0]) for p in preds]
    assert summary["acc@0.5"] == pytest.approx(np.mean([v >= 0.5 for v in ious]))
    assert summary["metrics"]["miou"] == pytest.approx(np.mean(ious), abs=1e-3)
    assert summary["verdict"] == ("grounds" if summary["acc@0.5"] >= 0.5 and summary["acc@0.5"] >= 5 * summary["chance"]["mean_box"]
                                  else "below target")
    # chance levels: a random shape of a 2-3 shape image is right about 1/3 to 1/2 of the time
    assert 0.2 <= summary["chance"]["random_shape"] <= 0.7
    assert 1 / 3 <= summary["chance"]["random_shape_pick"] <= 1 / 2 and 0.0 <= summary["selection"] <= 1.0
    # ... and by what each expression names, over the same 4 expressions
    from data_converters.shapes import expression_type

    types = [expression_type(r["expression"]) for r in shapes_records(out / "data")["val"]]
    by_type = summary["selection_by_type"]
    assert set(by_type) == {"all", *types} and by_type["all"] == summary["selection"]
    assert sum(by_type[t] * types.count(t) for t in set(types)) == pytest.approx(4 * summary["selection"])
    assert "on the named shape" in printed
    assert f"Acc@0.5 {summary['acc@0.5']:.3f}" in printed and "chance:" in printed
    # the curriculum: one-shape records, then colour-only ones, in file order, then the full mix
    order = json.loads((out / "train_curriculum.json").read_text())
    assert len(order) == 3 * 16 and [r["image"].split("/")[1] for r in order[:32]] == ["single"] * 16 + ["colour"] * 16
    # ... then the mix with its default shares of colour-only (0.3) and kind-only (0.2) images again
    folders = [r["image"].split("/")[1] for r in order[32:]]
    assert [folders.count(f) for f in ("colour", "kind", "train")] == [5, 3, 8]
    assert all("shape." in r["conversations"][0]["value"] for r in order if "/colour/" in r["image"])
    assert "curriculum: 1 steps on one-shape images, 1 steps of colour-only expressions, then 1 steps" in printed
    # each split was converted from its own annotation lines: nothing read twice, no other split's lines skipped
    for split in ("single", "colour", "kind", "train", "val"):
        conversion = json.loads((out / f"{split}.summary.json").read_text())
        assert conversion["skipped"] == 0 and conversion["read"] == len(shapes_records(out / "data")[split]), split
    # bench/demo_errors.py reads the finished folder: the same selection as the demo's, offsets from the answers
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("demo_errors", Path(__file__).parents[1] / "bench" / "demo_errors.py")
    demo_errors = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo_errors)
    assert demo_errors.run_errors(out)["selection"] == pytest.approx(summary["selection"])
    # ... and an oracle whose answers are the ground truth's tokens scores no error at all
    oracle = tmp_path / "oracle"
    oracle.mkdir()
    (oracle / "data").symlink_to(out / "data")
    val = json.loads((out / "val.json").read_text())
    (oracle / "val.json").write_text(json.dumps(val))
    (oracle / "predictions.jsonl").write_text("".join(json.dumps(
        {"id": r["id"], "text": r["conversations"][1]["value"], "shapes": r["getok"]["shapes"]}) + "\n" for r in val))
    errors = demo_errors.run_errors(oracle)
    assert errors["n"] == 4 and errors["selection"] == errors["precision"] == errors["right_cell"] == 1.0
    assert errors["corner_error_px"] == 0 and errors["keep_offset_predicted"] == errors["keep_offset_truth"]
    assert [len(demo_errors.corners(r["conversations"][1]["value"])) for r in val] == [2] * 4
    # the trained tower was saved with the checkpoint (LLaVA would otherwise reload the random one)
    assert (out / "llava-getok-demo" / "getok_config.json").is_file()
    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.size[0] > 100 and np.asarray(sheet).std() > 0
    # a quiet first run: training as a progress bar with the loss, none of the libraries' noise
    everything = captured.out + captured.err
    assert "training: 100%" in captured.err and "loss=" in captured.err and "{'loss'" not in everything
    assert "GETok: grid 8" in everything  # the trainer's own line is passed on
    for noise in ("FutureWarning", "Setting accelerator to CPU", "Some weights of", "gemm_4bit_forward",
                  "Formatting inputs", "legacy behaviour"):
        assert noise not in everything, noise


def test_demo_stages_run_one_shape_then_colour_only_then_kind_only_images_before_the_mix(tmp_path, capsys):
    from llava_getok.demo import main

    out = tmp_path / "demo"
    assert main(["--quick", "--single-steps", "5", "--kind-steps", "5", "--processes", "1", "--out", str(out)]) == 0
    assert ("curriculum: 1 steps on one-shape images, 1 steps of colour-only expressions, 1 steps of kind-only ones, "
            "then 1 steps of the full mix" in capsys.readouterr().out)
    order = json.loads((out / "train_curriculum.json").read_text())
    assert [r["image"].split("/")[1] for r in order[:48]] == ["single"] * 16 + ["colour"] * 16 + ["kind"] * 16
    scenes = {r["image"]: r["scene_boxes"] for r in map(json.loads, (out / "data" / "annotations.jsonl").open())}
    assert all(len(scenes[r["image"]]) == 1 for r in order[:16])
    assert all(3 <= len(scenes[r["image"]]) <= 4 for r in order[16:32])  # --colour-objects 3-4
    settings = json.loads((out / "data" / "shapes.json").read_text())  # up to --colour-turns 4 expressions a record
    assert settings["refs_per_image"]["colour"] == 4 and settings["n_objects"]["colour"] == [3, 4]
    kinds = {"the circle.", "the square.", "the triangle."}
    assert all(r["conversations"][0]["value"].rsplit(": ", 1)[1] in kinds for r in order[32:48])
    assert len(order) == 64 and {r["image"].split("/")[1] for r in order[48:]} <= {"colour", "kind", "train"}
    assert main(["--kind-steps", "100000", "--out", str(out)]) == 2  # no steps left for the mix
    assert main(["--single-steps", "-1", "--out", str(out)]) == 2
    for bad in (["--colour-objects", "0-2"], ["--objects", "two"], ["--colour-turns", "0"]):
        assert main([*bad, "--out", str(out)]) == 2, bad
    assert capsys.readouterr().err.splitlines()[-3:] == [
        "demo: shapes per image needs 1 <= MIN <= MAX, got '0-2'",
        "demo: shapes per image must be MIN-MAX, e.g. 2-4, got 'two'",
        "demo: --turns and --colour-turns must be >= 1, got 3 and 0"]


def test_curriculum_file_writes_each_stage_in_order_and_every_record_once_a_pass(tmp_path):
    from llava_getok.demo.data import curriculum_file

    first, rest = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(json.dumps([{"id": f"a{k}"} for k in range(10)]))
    rest.write_text(json.dumps([{"id": f"b{k}"} for k in range(4)]))
    out = curriculum_file(tmp_path / "c.json", [(6, {first: 1.0}), (9, {rest: 1.0})], seed=0)
    ids = [r["id"] for r in json.loads(out.read_text())]
    assert len(ids) == 15 and len(set(ids[:6])) == 6 and all(i.startswith("a") for i in ids[:6])
    passes = [ids[6:10], ids[10:14]]
    assert all(sorted(p) == ["b0", "b1", "b2", "b3"] for p in passes)  # every record once per pass
    again = curriculum_file(tmp_path / "d.json", [(6, {first: 1.0}), (9, {rest: 1.0})], 0)
    assert ids == [r["id"] for r in json.loads(again.read_text())]

    with pytest.raises(ValueError, match="a.json has 10 records .needs 11."):  # a first stage never repeats
        curriculum_file(tmp_path / "e.json", [(11, {first: 1.0}), (1, {rest: 1.0})], 0)


def test_curriculum_file_mixes_sources_by_share_and_goes_on_with_each_pass(tmp_path):
    from llava_getok.demo.data import curriculum_file

    first, rest, third = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "k.json"
    first.write_text(json.dumps([{"id": f"a{k}"} for k in range(10)]))
    rest.write_text(json.dumps([{"id": f"b{k}"} for k in range(4)]))
    third.write_text(json.dumps([{"id": f"k{k}"} for k in range(5)]))
    stages = [(6, {first: 1.0}), (10, {first: 0.3, third: 0.2, rest: 0.5})]
    ids = [r["id"] for r in json.loads(curriculum_file(tmp_path / "c.json", stages, 0).read_text())]
    assert len(ids) == 16 and all(i.startswith("a") for i in ids[:6])
    second = ids[6:]
    assert [sum(i.startswith(c) for i in second) for c in "akb"] == [3, 2, 5]
    assert second != sorted(second, key=lambda i: "akb".index(i[0]))  # the sources are shuffled together
    # the first stage's pass goes on into the second stage before any of its records repeats
    assert len(set(ids[:6]) | {i for i in second if i.startswith("a")}) == 9
    b = [i for i in second if i.startswith("b")]
    assert {b.count(f"b{k}") for k in range(4)} == {1, 2}  # one pass and one of the next

    with pytest.raises(ValueError, match="stage 2 must be >= 0 and sum to 1"):
        curriculum_file(tmp_path / "e.json", [(6, {first: 1.0}), (10, {first: 0.6, rest: 0.6})], 0)


def test_sincos_positions_fill_the_given_dimensions_and_leave_the_rest_to_content():
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from llava_getok.demo.model import set_sincos_positions

    tower = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=32, patch_size=8))
    set_sincos_positions(tower, dims=16)
    pe = tower.vision_model.embeddings.position_embedding.weight.detach()
    assert torch.all(pe[:, 16:] == 0) and torch.all(pe[0] == 0)
    assert len({tuple(r.tolist()) for r in pe[1:, :16].round(decimals=4)}) == 16  # every patch its own code
    set_sincos_positions(tower)
    assert (tower.vision_model.embeddings.position_embedding.weight[1:, 16:].abs().sum(1) > 0).all()


def test_demo_with_a_baseline_format_and_a_learning_curve_reruns_into_the_same_folder(tmp_path, capsys):
    """(One training process: the default two are test_demo_quick_runs_end_to_end's.) --format text: the same job with LLaVA-1.5's text boxes (free decoding, parsed by eval); --eval-every: each
    saved checkpoint scored; a second run into the same folder with another format starts afresh instead of
    resuming the first run's checkpoint (LLaVA's train() resumes from any checkpoint-* in its output folder)."""
    from llava_getok.demo import main

    out = tmp_path / "demo"
    assert main(["--quick", "--out", str(out), "--format", "text", "--eval-every", "1", "--processes", "1"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    answer = json.loads((out / "val.json").read_text())[0]["conversations"][1]["value"]
    assert answer.startswith("[0.") and answer.count(", ") == 3 and summary["tokens_per_answer"] > 10
    assert json.loads((out / "llava-getok-demo" / "getok_config.json").read_text())["format"]["name"] == "text"
    assert [p["step"] for p in summary["curve"]] == [1, 2, 3] and all(p["n"] == 4 for p in summary["curve"])
    assert summary["metrics"]["n"] == 4
    assert main(["--quick", "--out", str(out), "--format", "bins", "--bins", "16", "--processes", "1"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["curve"] == [] and summary["tokens_per_answer"] == 4.0 and summary["metrics"]["unparseable"] == 0
    assert json.loads((out / "llava-getok-demo" / "getok_config.json").read_text())["format"] == {"name": "bins", "bins": 16}
    assert "checkpoint-1" not in {p.name for p in (out / "llava-getok-demo").iterdir()}


def test_every_schedule_the_demo_offers_parses_and_builds_and_wsd_holds_then_decays(tmp_path):
    """Each --schedule choice goes through the Trainer's own argument parser and transformers' get_scheduler with
    the arguments the demo passes (warmup_stable_decay needs num_decay_steps: without it the training process
    died with a TypeError deep inside transformers)."""
    import torch
    from transformers import HfArgumentParser, TrainingArguments, get_scheduler

    from llava_getok.demo import main, parser
    from llava_getok.demo.training import SCHEDULES, train_args

    def args_of(flags):
        a = parser().parse_args(["--steps", "400", *flags])
        argv = train_args(tmp_path / "m", tmp_path / "t.json", tmp_path, tmp_path / "c", a)
        keep = {"--output_dir", "--max_steps", "--learning_rate", "--lr_scheduler_type", "--lr_scheduler_kwargs", "--warmup_steps"}
        pairs = [argv[k:k + 2] for k in range(len(argv) - 1) if argv[k] in keep]
        return HfArgumentParser(TrainingArguments).parse_args_into_dataclasses([v for p in pairs for v in p] + ["--use_cpu", "True"])[0]

    for name in SCHEDULES:
        t = args_of(["--schedule", name])
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=t.learning_rate)
        sched = get_scheduler(t.lr_scheduler_type, opt, num_warmup_steps=t.warmup_steps,
                              num_training_steps=t.max_steps, scheduler_specific_kwargs=t.lr_scheduler_kwargs)
        lrs = []
        for _ in range(t.max_steps):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        assert max(lrs) == t.learning_rate and (lrs[0] < t.learning_rate) == (name != "constant"), name
        if name == "warmup_stable_decay":  # constant from the warm-up to the last quarter, then down to 0
            assert t.lr_scheduler_kwargs == {"num_decay_steps": 100}
            assert lrs[50] == lrs[299] == t.learning_rate and lrs[350] < t.learning_rate and lrs[-1] < 1e-5
    assert args_of(["--schedule", "warmup_stable_decay", "--decay-steps", "40"]).lr_scheduler_kwargs == {"num_decay_steps": 40}
    for bad in (["--schedule", "cosine", "--decay-steps", "40"], ["--schedule", "warmup_stable_decay", "--decay-steps", "0"],
                ["--schedule", "warmup_stable_decay", "--decay-steps", "3951"]):
        assert main(["--steps", "4000", "--out", str(tmp_path / "x"), *bad]) == 2, bad


def test_demo_sigma_reaches_the_box_token_loss_settings_of_the_training_run(tmp_path):
    """--sigma is the training run's --getok_sigma: the demo's argv, parsed by python -m llava_getok.train's own
    parser, gives the settings the loss is built from (by default one-hot targets on the demo's 8 x 8 grid, not the
    trainer's default of 1 cell)."""
    from llava_getok.demo import parser
    from llava_getok.demo.training import train_args
    from llava_getok.training.settings import GETokSettings
    from llava_getok.train import getok_parser, settings_from

    def sigma_of(flags):
        argv = train_args(tmp_path / "m", tmp_path / "t.json", tmp_path, tmp_path / "c", parser().parse_args(flags))
        return settings_from(getok_parser().parse_known_args(argv)[0]).sigma

    assert sigma_of([]) == 0.0 and GETokSettings().sigma == 1.0
    assert sigma_of(["--sigma", "1"]) == 1.0 and sigma_of(["--sigma", "0.5"]) == 0.5
    from llava_getok.demo import main

    assert main(["--sigma", "-1", "--out", str(tmp_path / "x")]) == 2 and not (tmp_path / "x").exists()
