"""llava_getok.masks: the greedy of spec section 6 on a picture whose objects superpixels can find, the
general (overlapping proposals) path against the partition path, refine offsets, SAM's clear error."""
from __future__ import annotations

import numpy as np
import pytest

from llava_getok.geometry import mask_iou
from llava_getok.masks import (
    SamGenerator,
    SuperpixelGenerator,
    greedy_mask_anchors,
    mask_from_anchors,
    mask_refinement_offsets,
)
from llava_getok.vocab import GETokConfig

CFG = GETokConfig(grid=16, mode="grid")


def scene():
    """A 160 x 120 picture: grey background, a red rectangle and a blue disc (the targets)."""
    img = np.full((120, 160, 3), 200, np.uint8)
    rect = np.zeros((120, 160), bool)
    rect[20:70, 30:100] = True
    yy, xx = np.mgrid[:120, :160]
    disc = (xx - 125) ** 2 + (yy - 85) ** 2 < 20**2
    img[rect] = (220, 30, 30)
    img[disc] = (30, 40, 220)
    return img, rect, disc


class WithoutSegments:
    """The same proposals, but through the general path (no ``segments``: as SAM is treated)."""

    def __init__(self, gen):
        self.gen = gen

    def masks_at(self, image, points_px):
        return self.gen.masks_at(image, points_px)


@pytest.mark.parametrize("frame", ["pad", "orig"])
def test_greedy_finds_few_anchors_whose_union_is_the_object(frame):
    img, rect, disc = scene()
    gen = SuperpixelGenerator(n_segments=60)
    for gt in (rect, disc):
        pts = greedy_mask_anchors(gt, img, CFG, frame, gen)
        assert 1 <= len(pts) < 40
        decoded = mask_from_anchors(pts, img, frame, gen)
        assert mask_iou(decoded, gt) >= 0.8
        assert pts == sorted(pts, key=lambda p: (p[1], p[0]))  # row-major
        assert greedy_mask_anchors(gt, img, CFG, frame, SuperpixelGenerator(n_segments=60)) == pts  # deterministic
        assert greedy_mask_anchors(gt, img, CFG, frame, WithoutSegments(gen)) == pts  # both paths agree


def test_greedy_stops_at_max_points_and_on_empty_masks():
    img, rect, _ = scene()
    gen = SuperpixelGenerator(n_segments=200)
    assert len(greedy_mask_anchors(rect, img, CFG, "pad", gen, tau=1.0, max_points=3)) == 3
    assert greedy_mask_anchors(np.zeros_like(rect), img, CFG, "pad", gen) == []


def test_refine_offsets_keep_inside_move_the_ring_delete_the_far():
    _, rect, _ = scene()  # rect: x in [30, 100), y in [20, 70) of a 160 x 120 image
    cfg = GETokConfig(grid=16, mode="refine")  # orig frame: a step is half a cell = 5 px in x, 3.75 px in y
    inside, ring, far = (65 / 160, 45 / 120), (28 / 160, 45 / 120), (140 / 160, 100 / 120)
    offs = mask_refinement_offsets([inside, ring, far], rect, cfg, "orig")
    assert offs[0] == (0, 0) and offs[2] is None
    assert offs[1][0] == 1  # moved right, into the rectangle


def test_sam_generator_says_what_to_install():
    try:
        import segment_anything  # noqa: F401
    except ImportError:
        gen = SamGenerator("missing.pth", "vit_b")
        with pytest.raises(ImportError, match="segment-anything"):
            gen.masks_at(np.zeros((8, 8, 3), np.uint8), [[1, 1]])
    else:
        pytest.skip("segment_anything is installed")


def test_generator_config_round_trips():
    from llava_getok.masks import generator_from_config

    gen = generator_from_config(SuperpixelGenerator(n_segments=60, compactness=5.0).config())
    assert (gen.n_segments, gen.compactness) == (60, 5.0)
    assert isinstance(generator_from_config({"generator": "sam", "model_type": "vit_b", "checkpoint": "x.pth"}), SamGenerator)
    with pytest.raises(ValueError, match="unknown proposal generator"):
        generator_from_config({"generator": "magic"})
