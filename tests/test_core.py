"""GETok core: vocab, codec and parse against the spec (sections 2-5, 8), by hand and by property."""
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import llava_getok as gt
from llava_getok.codec import CLIP_TOLERANCE, Refinement, Shape, dequantize, quantize
from llava_getok.geometry import box_giou, box_iou, boxes_from_frame, boxes_to_frame, points_from_frame, points_to_frame

coord = st.floats(0.0, 1.0, allow_nan=False)
configs = st.builds(
    gt.GETokConfig,
    grid=st.sampled_from([1, 4, 7, 32, 64]),
    rounds=st.integers(0, 3),
    offset_levels=st.sampled_from([3, 5, 7]),
    schedule=st.sampled_from(["halving", "fixed"]),
    mode=st.just("inline"),
)


# -- vocabulary ------------------------------------------------------------------------------------------

def test_vocabulary_sizes_order_and_names():
    cfg = gt.GETokConfig()
    toks = cfg.tokens()
    assert len(toks) == 32 * 32 + 9 + 1 + 8 and len(set(toks)) == len(toks)
    assert toks[0] == "<grid_0_0>" and toks[1] == "<grid_1_0>" and toks[32] == "<grid_0_1>"
    assert toks[1024:1033] == tuple(f"<off_{dx}_{dy}>" for dy in (-1, 0, 1) for dx in (-1, 0, 1))
    assert toks[1033:] == ("<delete>", "<box>", "</box>", "<seg>", "</seg>", "<pl>", "</pl>", "<offset>", "</offset>")
    assert gt.GETokConfig(offset_levels=5).tokens() == gt.GETokConfig(offset_levels=5).tokens()
    assert len(gt.GETokConfig(offset_levels=5).offset_tokens) == 25


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(mode="grid", rounds=1), "rounds must be 0"),
        (dict(mode="refine", rounds=2), "rounds must be 1"),
        (dict(offset_levels=4), "odd integer"),
        (dict(mode="bogus"), "mode must be one of"),
        (dict(schedule="linear"), "schedule must be one of"),
        (dict(grid=0), "grid must be"),
        (dict(rounds=-1), "non-negative"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        gt.GETokConfig(**kwargs)


def test_config_defaults_rounds_by_mode_and_round_trips_through_dict():
    assert gt.GETokConfig(mode="grid").rounds == 0
    assert gt.GETokConfig(mode="refine").rounds == 1
    cfg = gt.GETokConfig(grid=16, rounds=2, offset_levels=5, schedule="fixed")
    assert gt.GETokConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("n", [1, 3, 32, 50])
def test_cells_and_anchors_are_inverse_and_follow_the_spec(n):
    """Spec section 3: anchor ((i + 0.5)/n, (j + 0.5)/n); i = min(floor(x n), n - 1) after clipping to [0, 1]."""
    cfg = gt.GETokConfig(grid=n)
    a = cfg.grid_anchors
    assert a.shape == (n * n, 2) and a[0].tolist() == [0.5 / n] * 2 and a[-1].tolist() == [(n - 0.5) / n] * 2
    cells = cfg.cells(a)
    assert (cells[:, 1] * n + cells[:, 0] == np.arange(n * n)).all()  # row-major, the order of grid_tokens
    assert (cfg.anchors(cells) == a).all()
    x = np.array([-0.005, 0.0, 1 / n - 1e-12, 1 / n, 0.999999, 1.0, 1.004])
    assert cfg.cells(x).tolist() == [0, 0, 0, min(1, n - 1), n - 1, n - 1, n - 1]
    assert (np.abs(cfg.anchors(cfg.cells(np.clip(x, 0, 1))) - np.clip(x, 0, 1)) <= 0.5 / n + 1e-12).all()


def test_rounds_steps_and_mode_variants_asked_of_the_config():
    inline, grid, refine = gt.GETokConfig(grid=8, rounds=2), gt.GETokConfig(grid=8, mode="grid"), gt.GETokConfig(grid=8, mode="refine")
    assert (inline.inline_rounds, grid.inline_rounds, refine.inline_rounds) == (2, 0, 0)
    assert inline.steps(2).tolist() == [1 / 16, 1 / 32] and inline.steps(0).shape == (0,)
    assert gt.GETokConfig(grid=8, rounds=2, schedule="fixed").steps(2).tolist() == [1 / 16, 1 / 16]
    assert refine.with_mode("grid") == grid and inline.with_mode("refine") == refine
    lattice = gt.GETokConfig(grid=8, offset_levels=5, schedule="fixed", mode="refine").with_mode("grid")
    assert (lattice.grid, lattice.offset_levels, lattice.schedule, lattice.rounds) == (8, 5, "fixed", 0)


def test_error_bounds_match_spec():
    assert gt.GETokConfig(grid=32, rounds=0, mode="grid").max_error == 1 / 64
    assert gt.GETokConfig(grid=32, rounds=1).max_error == 1 / 128
    assert gt.GETokConfig(grid=32, rounds=2).max_error == 1 / 256
    assert gt.GETokConfig(grid=32, rounds=1, offset_levels=5).max_error == 1 / (2 * 32 * 4)


# -- hand-computed examples ------------------------------------------------------------------------------

def test_spec_box_example_decodes_by_hand():
    cfg = gt.GETokConfig(grid=32, rounds=1)
    text = "<box><grid_3_7><off_1_0><grid_9_12><off_0_-1></box>"
    # anchor (3.5, 7.5)/32 + (1/64, 0); anchor (9.5, 12.5)/32 + (0, -1/64)
    assert gt.decode_box(text, cfg) == (4 / 32, 7.5 / 32, 9.5 / 32, 12 / 32)
    assert gt.encode_box(gt.decode_box(text, cfg), cfg) == "<box><grid_4_7><off_-1_0><grid_9_12><off_0_-1></box>"


def test_quantisation_at_zero_one_and_cell_edges():
    cfg = gt.GETokConfig(grid=8, mode="grid")
    cells, _ = quantize([[0, 0], [1, 1], [1 / 8, 7 / 8], [0.5 - 1e-12, 0.5]], cfg)
    assert cells.tolist() == [[0, 0], [7, 7], [1, 7], [3, 4]]
    assert gt.encode_point((1.0, 0.0), cfg) == "<grid_7_0>"


def test_offset_ties_go_to_the_smaller_magnitude():
    cfg = gt.GETokConfig(grid=4, rounds=1)
    # cell 1 spans [0.25, 0.5): anchor 0.375, step 0.125; 0.4375 is equally far from 0.375 and 0.5
    _, offs = quantize([[0.4375, 0.3125]], cfg)
    assert offs.tolist() == [[[0, 0]]]
    assert gt.encode_point((0.49, 0.26), cfg) == "<grid_1_1><off_1_-1>"


def test_halving_and_fixed_schedules_differ_from_round_two():
    halving, fixed = gt.GETokConfig(grid=4, rounds=2), gt.GETokConfig(grid=4, rounds=2, schedule="fixed")
    assert halving.step(1) == fixed.step(1) == 1 / 8
    assert halving.step(2) == 1 / 16 and fixed.step(2) == 1 / 8
    assert dequantize([[1, 1]], [[[1, 1], [1, -1]]], halving).tolist() == [[0.5 + 1 / 16, 0.5 - 1 / 16]]


def test_modes_write_offsets_only_inline():
    box = (0.1, 0.2, 0.61, 0.9)
    assert gt.encode_box(box, gt.GETokConfig(grid=4, mode="grid")) == "<box><grid_0_0><grid_2_3></box>"
    assert gt.encode_box(box, gt.GETokConfig(grid=4, mode="refine")) == "<box><grid_0_0><grid_2_3></box>"
    assert gt.encode_box(box, gt.GETokConfig(grid=4)) == "<box><grid_0_0><off_0_1><grid_2_3><off_0_0></box>"


def test_polyline_merges_consecutive_vertices_in_one_cell_and_mask_is_row_major():
    cfg = gt.GETokConfig(grid=4, mode="grid")
    assert gt.encode_polyline([(0.1, 0.1), (0.2, 0.2), (0.6, 0.1), (0.1, 0.1)], cfg) == (
        "<pl><grid_0_0><grid_2_0><grid_0_0></pl>"
    )
    assert gt.encode_mask_points([(0.9, 0.9), (0.1, 0.6), (0.6, 0.1), (0.65, 0.15)], cfg) == (
        "<seg><grid_2_0><grid_0_2><grid_3_3></seg>"
    )


@pytest.mark.parametrize(
    "box, match",
    [
        ((0.5, 0.1, 0.2, 0.3), "x2 < x1"),
        ((0.1, float("nan"), 0.2, 0.3), "finite"),
        ((0.1, 0.1, 1.5, 0.3), "outside the normalised frame"),
        ((10, 10, 200, 300), "pixel"),
    ],
)
def test_invalid_geometry_raises_a_clear_value_error(box, match):
    with pytest.raises(ValueError, match=match):
        gt.encode_box(box, gt.GETokConfig())


def test_slightly_outside_is_clipped():
    cfg = gt.GETokConfig(grid=4, mode="grid")
    eps = CLIP_TOLERANCE / 2
    assert gt.encode_box((-eps, -eps, 1 + eps, 1 + eps), cfg) == "<box><grid_0_0><grid_3_3></box>"


# -- properties ------------------------------------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(cfg=configs, x=coord, y=coord)
def test_point_round_trip_within_the_error_bound(cfg, x, y):
    dx, dy = np.abs(np.subtract(gt.decode_point(gt.encode_point((x, y), cfg), cfg), (x, y)))
    assert dx <= cfg.max_error + 1e-12 and dy <= cfg.max_error + 1e-12


@settings(max_examples=200, deadline=None)
@given(cfg=configs, a=coord, b=coord, c=coord, d=coord)
def test_box_round_trip_within_the_error_bound(cfg, a, b, c, d):
    box = (min(a, c), min(b, d), max(a, c), max(b, d))
    got = gt.decode_box(gt.encode_box(box, cfg), cfg)
    assert np.abs(np.subtract(got, box)).max() <= cfg.max_error + 1e-12


def test_batch_encoding_matches_single_and_one_million_boxes_round_trip():
    cfg = gt.GETokConfig(grid=32, rounds=1)
    rng = np.random.default_rng(0)
    xy = rng.random((20000, 2, 2))
    boxes = np.concatenate([xy.min(1), xy.max(1)], 1)
    texts = gt.encode_boxes(boxes, cfg)
    assert texts[:50] == [gt.encode_box(b, cfg) for b in boxes[:50]]
    decoded = np.array([gt.decode_box(t, cfg) for t in texts[:2000]])
    assert np.abs(decoded - boxes[:2000]).max() <= cfg.max_error + 1e-12
    assert np.array_equal(gt.decode_boxes(texts, cfg)[:2000], decoded)
    assert np.abs(gt.decode_boxes(texts, cfg) - boxes).max() <= cfg.max_error + 1e-12
    with pytest.raises(ValueError, match="text 1 is not one box"):
        gt.decode_boxes([texts[0], texts[1][:-1]], cfg)


shape_kind = st.sampled_from(["point", "box", "polyline", "mask"])


@st.composite
def shapes_lists(draw):
    cfg = draw(st.builds(gt.GETokConfig, grid=st.sampled_from([4, 32]), rounds=st.integers(0, 2),
                         mode=st.just("inline")))
    shapes = []
    for kind in draw(st.lists(shape_kind, max_size=5)):
        pts = draw(st.lists(st.tuples(coord, coord), min_size=1, max_size=6))
        if kind == "point":
            shapes.append(Shape("point", (pts[0],)))
        elif kind == "box":
            (a, b), (c, d) = pts[0], (pts + pts)[1]
            shapes.append(Shape("box", ((min(a, c), min(b, d)), (max(a, c), max(b, d)))))
        else:
            shapes.append(Shape(kind, tuple(pts)))
    return cfg, shapes


@settings(max_examples=200, deadline=None)
@given(shapes_lists())
def test_parse_inverts_render(data):
    cfg, shapes = data
    decoded = gt.parse(gt.render(shapes, cfg), cfg)  # onto the lattice first
    assert decoded.ok and [s.kind for s in decoded.shapes] == [s.kind for s in shapes]
    again = gt.parse(gt.render(decoded.shapes, cfg, sep=" and then "), cfg)
    assert again.ok and again.shapes == decoded.shapes


# -- parsing malformed output ----------------------------------------------------------------------------

@pytest.mark.parametrize(
    "text, message",
    [
        ("<box><grid_1_1></box>", "box at 0 has 1 point(s), expected 2"),
        ("x <off_1_0>", "<off_1_0> at 2 has no grid token before it"),
        ("<box><grid_1_1><grid_2_2>", "<box> at 0 is never closed"),
        ("<seg></seg>", "mask at 0 has no points"),
        ("<grid_40_1>", "outside the 4x4 grid"),
        ("<grid_1_1><off_2_0>", "outside the offset alphabet"),
        ("</pl>", "does not close an open <pl>"),
        ("<box><grid_1_1><pl><grid_0_0></pl>", "<box> at 0 is not closed before <pl> at 15"),
    ],
)
def test_malformed_output_gives_positioned_errors_not_exceptions(text, message):
    res = gt.parse(text, gt.GETokConfig(grid=4, mode="grid"))
    assert any(message in e.message for e in res.errors), res.errors


def test_good_groups_survive_a_bad_neighbour_and_inline_counts_offsets():
    cfg = gt.GETokConfig(grid=4, rounds=1)
    res = gt.parse("<box><grid_0_0><off_0_0></box> <grid_1_1><off_0_0> <grid_2_2>", cfg)
    assert [s.kind for s in res.shapes] == ["point"]
    assert [e.message for e in res.errors] == [
        "box at 0 has 1 point(s), expected 2",
        "point at 51 has 0 offset token(s), expected 1",
    ]
    assert res.shapes[0].span == (31, 50)


def test_parse_ids_only_counts_real_token_ids():
    cfg = gt.GETokConfig(grid=4, mode="grid")
    id_to_token = {100 + k: t for k, t in enumerate(cfg.tokens())}
    box, close, g00, g33 = 100 + cfg.tokens().index("<box>"), 100 + cfg.tokens().index("</box>"), 100, 115
    res = gt.parse_ids([5, box, g00, g33, close, 7], id_to_token, cfg)
    assert res.ok and res.shapes[0].points == ((0.125, 0.125), (0.875, 0.875))
    assert gt.parse_ids([5, 6, 7], id_to_token, cfg).shapes == []  # text ids, even if they spell "<box>"


# -- refine mode -----------------------------------------------------------------------------------------

def test_refinement_round_trip_reaches_the_one_round_bound():
    cfg = gt.GETokConfig(grid=32, mode="refine")
    box = (0.211, 0.3, 0.77, 0.9141)
    first = gt.parse(gt.encode_box(box, cfg), cfg).shapes
    offs = gt.refinement_offsets(first[0].points, [box[:2], box[2:]], cfg)
    text = gt.encode_refinement([Refinement("box", tuple(offs))], cfg)
    assert text.startswith("<offset><box><off_") and text.endswith("</box></offset>")
    refined = gt.apply_refinement(first, gt.parse(text, cfg).refinements, cfg)
    assert np.abs(np.subtract(refined[0].box, box)).max() <= 1 / 128 + 1e-12
    inline = gt.decode_box(gt.encode_box(box, gt.GETokConfig(grid=32, rounds=1)), gt.GETokConfig(grid=32, rounds=1))
    assert refined[0].box == pytest.approx(inline)


def test_refinement_delete_drops_points_and_structure_must_match():
    cfg = gt.GETokConfig(grid=4, mode="refine")
    first = gt.parse("<seg><grid_0_0><grid_1_0></seg><box><grid_0_0><grid_1_1></box>", cfg).shapes
    refs = gt.parse("<offset><seg><delete><off_1_0></seg><box><delete><off_0_0></box></offset>", cfg).refinements
    out = gt.apply_refinement(first, refs, cfg)
    assert [(s.kind, s.points) for s in out] == [("mask", ((0.375 + 0.125, 0.125),))]
    with pytest.raises(ValueError, match="refinement group 0"):
        gt.apply_refinement(first, refs[::-1], cfg)


# -- geometry --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [(640, 427), (480, 640), (333, 333), (641, 100)])
def test_frames_round_trip_pixels_and_pad_uses_llavas_integer_offset(size):
    w, h = size
    s = max(w, h)
    px = np.array([[0, 0], [w, h], [w / 3, h / 2]])
    norm = points_to_frame(px, size, "pad")
    assert norm[0].tolist() == [((s - w) // 2) / s, ((s - h) // 2) / s]
    for frame in ("pad", "orig"):
        assert np.allclose(points_from_frame(points_to_frame(px, size, frame), size, frame), px)
    box = np.array([[10, 20, w - 5, h - 7]])
    assert np.allclose(boxes_from_frame(boxes_to_frame(box, size, "pad"), size, "pad"), box)
    # predictions in the padding are clamped back onto the image
    assert points_from_frame([[0.0, 0.0]], size, "pad").tolist() == [[0.0, 0.0]]


def test_iou_and_giou_by_hand():
    assert box_iou([0, 0, 2, 2], [1, 1, 3, 3]) == pytest.approx(1 / 7)
    assert box_iou([0, 0, 1, 1], [2, 2, 3, 3]) == 0
    assert box_giou([0, 0, 1, 1], [2, 2, 3, 3]) == pytest.approx(0 - (9 - 2) / 9)
    assert box_iou(np.array([[0, 0, 2, 2]] * 3), np.array([0, 0, 2, 2])).tolist() == [1.0] * 3
    assert box_iou([0, 0, 0, 0], [0, 0, 0, 0]) == 0
    with pytest.raises(ValueError, match="frame must be one of"):
        points_to_frame([[0, 0]], (10, 10), "square")
    with pytest.raises(ValueError, match="positive"):
        points_to_frame([[0, 0]], (0, 10), "pad")
    assert not math.isnan(float(box_giou([0, 0, 0, 0], [0, 0, 0, 0])))
