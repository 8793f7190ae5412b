"""``bench/real_shapes.py --family qwen2.5-vl`` on its tiny layout: both cells (plain Qwen2.5-VL on its own JSON
answers, GETok with its rows as peft trainable tokens) train through the hf backend's build and trl's SFTTrainer,
the table is written, and full fine-tuning that cannot fit the machine is skipped with its reason. The cells run in
this process (the script runs each in a process of its own)."""
import argparse
import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("real_shapes", REPO / "bench" / "real_shapes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_qwen_family_runs_both_cells_and_writes_the_table(tmp_path, monkeypatch):
    rs = _script()
    results = {}

    def in_process(job, threads):
        results[job["trainer"]] = rs.qwen_worker(job)
        return results[job["trainer"]]

    monkeypatch.setattr(rs, "run_worker", in_process)
    monkeypatch.setattr(rs, "total_memory", lambda: 2**20)  # full fine-tuning cannot fit: skipped, with the reason
    args = argparse.Namespace(layers=1, batch=1, steps=1, device="cpu", threads=1, precisions="fp32",
                              modes="lora,full", layout="tiny")
    assert rs.qwen_main(args, out_dir=tmp_path) == 0
    plain, getok = results["plain"], results["GETok"]
    added = 1042  # GETokConfig(grid=32): one offset round
    assert getok["vocab_rows"] == 700 + len(rs.QWEN25_ADDED) + added and plain["vocab_rows"] == 800  # spare rows kept
    assert getok["image_tokens"] == plain["image_tokens"] > 0 and getok["labelled"] < plain["labelled"]
    assert getok["trainable"] > plain["trainable"] and getok["rows_bytes"] > 0
    assert all(r["step_s"] > 0 and r["peak_bytes"] > 0 and len(r["losses"]) == 3 for r in (plain, getok))
    text = (tmp_path / "real_shapes_qwen_tiny.md").read_text()
    assert "| fp32 | lora |" in text and "| fp32 | full |" not in text
    assert "fp32 full: not run" in text and "--family qwen2.5-vl --layout tiny" in text
