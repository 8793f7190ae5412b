"""The checkpoint's sidecar (getok_config.json): schema 2 records every option of the run, and version-1 sidecars,
as checkpoints written before it hold them, read into it without loss."""
import json
from dataclasses import asdict

import pytest

from llava_getok.formats import BinsFormat
from llava_getok.training.settings import GETokSettings
from llava_getok.training.sidecar import FORMAT_VERSION, SIDECAR, Sidecar, read_sidecar, write_sidecar
from llava_getok.vocab import GETokConfig

# a sidecar exactly as a version-1 training run wrote it (the tiny model's GETok run, grid 8)
V1 = {
    "getok": {"grid": 8, "rounds": 1, "offset_levels": 3, "schedule": "halving", "mode": "inline"},
    "tokens": ["<grid_0_0>", "<grid_1_0>"], "token_ids": [1000, 1001], "vocab_size": 1082, "tokenizer_legacy": False,
    "image_aspect_ratio": "pad", "frame": "pad", "kind": "lora", "base_model": "/models/tiny-llava",
    "init": "sincos2d", "loss": {"grid_weight": 0.5, "box_weight": 0.5, "sigma": 1.0, "offset_sigma": 0.0},
    "vision_tower_trained": False, "format": {"name": "getok", "grid": 8, "rounds": 1, "offset_levels": 3,
                                              "schedule": "halving", "mode": "inline"}, "format_version": 1}


def test_a_version_1_sidecar_reads_into_schema_2_without_loss(tmp_path):
    (tmp_path / SIDECAR).write_text(json.dumps(V1))
    s = read_sidecar(tmp_path)
    assert s.format_version == FORMAT_VERSION == 2
    assert s.location_format == GETokConfig(grid=8) and s.config.grid == 8
    assert (s.tokens, s.token_ids, s.vocab_size, s.kind, s.base_model) == (V1["tokens"], V1["token_ids"], 1082,
                                                                          "lora", "/models/tiny-llava")
    assert s.image_aspect_ratio == "pad" and s.processor == {"image_aspect_ratio": "pad"} and s.frame == "pad"
    assert s.settings == {"init": "sincos2d", **V1["loss"]} and s.template is None and s.backend == "llava"
    # the oldest sidecars have no "format": their GETok config is the format
    oldest = {k: v for k, v in V1.items() if k != "format"}
    (tmp_path / SIDECAR).write_text(json.dumps(oldest))
    assert read_sidecar(tmp_path).location_format == GETokConfig(grid=8)


def test_schema_2_round_trips_every_setting_and_refuses_unknown_versions(tmp_path):
    settings = GETokSettings(format="bins", bins=64, sigma=0.0, rows="delta", data_order="file")
    fmt = BinsFormat(bins=64)
    s = Sidecar.of(fmt, list(range(7, 71)), vocab_size=2000, tokenizer_legacy=False, kind="full", frame="pad",
                   template="getok_mistral_instruct", processor={"image_aspect_ratio": "pad"}, settings=asdict(settings))
    write_sidecar(tmp_path, s)
    back = read_sidecar(tmp_path)
    assert back == s and GETokSettings(**back.settings) == settings and back.location_format == fmt
    data = json.loads((tmp_path / SIDECAR).read_text())
    data["format_version"] = 3
    (tmp_path / SIDECAR).write_text(json.dumps(data))
    with pytest.raises(ValueError, match="format_version 3, this version reads 1 and 2"):
        read_sidecar(tmp_path)
