"""`llava-getok recipes --out DIR` from this checkout (editable install or not): the repository's own scripts/,
DeepSpeed configs and patches/, written where the user asks (tests/test_wheel.py: the same from the wheel)."""
import os
from pathlib import Path

from llava_getok.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_recipes_writes_the_repositorys_files_and_keeps_a_changed_one(tmp_path, capsys):
    out = tmp_path / "recipes"
    assert main(["recipes", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    expected = ["finetune_getok.sh", "finetune_getok_lora.sh", "grpo_getok.sh", "finetune_getok_qwen.sh",
                "grpo_getok_qwen.sh", "zero2.json", "zero3.json",
                *(f"patches/{p.name}" for p in (REPO / "patches").glob("*.patch"))]
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == sorted(expected)
    for name in expected:
        assert (out / name).read_bytes() == (REPO / ("scripts" if "/" not in name else "") / name).read_bytes()
        assert os.access(out / name, os.X_OK) == name.endswith(".sh")
        assert f"wrote {out / name}" in printed
    # a file the user changed is kept and named (exit 1); --force overwrites it; the same bytes are no change
    (out / "zero3.json").write_text("{}")
    assert main(["recipes", "--out", str(out)]) == 1
    assert "kept" in capsys.readouterr().err and (out / "zero3.json").read_text() == "{}"
    assert main(["recipes", "--out", str(out), "--force"]) == 0
    assert (out / "zero3.json").read_bytes() == (REPO / "scripts" / "zero3.json").read_bytes()
    assert not [p for p in out.rglob("*.tmp")]  # atomic writes leave no temp files
