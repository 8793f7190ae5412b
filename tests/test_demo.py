"""`llava-getok demo --quick`: the whole job runs end to end (data, convert, tiny LLaVA, `python -m
llava_getok.train`, constrained prediction, eval, contact sheet) and reports Acc@0.5 beside its chance levels.
Two training steps: this checks the plumbing, not the learning (bench/learning_trials.py measures that)."""
from __future__ import annotations

import json

import numpy as np
from PIL import Image


def test_demo_quick_runs_end_to_end(tmp_path, capsys):
    from llava_getok.demo import main

    out = tmp_path / "demo"
    assert main(["--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped"] == []
    # evaluated on every val record; constrained, shape-only decoding always yields one parseable box
    assert summary["metrics"]["n"] == 4 and summary["metrics"]["unparseable"] == 0
    assert 0.0 <= summary["acc@0.5"] <= 1.0
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 4 and all(len(p["shapes"]) == 1 and p["shapes"][0]["kind"] == "box" for p in preds)
    # chance levels: a random shape of a 2-3 shape image is right about 1/3 to 1/2 of the time
    assert 0.2 <= summary["chance"]["random_shape"] <= 0.7
    assert 1 / 3 <= summary["chance"]["random_shape_pick"] <= 1 / 2 and 0.0 <= summary["selection"] <= 1.0
    assert "on the named shape" in printed
    assert f"Acc@0.5 {summary['acc@0.5']:.3f}" in printed and "chance:" in printed
    # the trained tower was saved with the checkpoint (LLaVA would otherwise reload the random one)
    assert (out / "llava-getok-demo" / "getok_config.json").is_file()
    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.size[0] > 100 and np.asarray(sheet).std() > 0
