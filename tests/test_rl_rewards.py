"""GRPO rewards: each score against hand-computed values, and the trl-shaped callables end to end."""
import json
import pickle

import numpy as np
import pytest

from llava_getok.codec import Refinement, Shape
from llava_getok.rl.rewards import get_reward
from llava_getok.rl.scores import (
    RewardConfig,
    Target,
    answer_span,
    box_score,
    inside_target,
    parse_completion,
    points_score,
    refine_point_scores,
    refine_score,
    repetition_score,
    target_from_getok,
)
from llava_getok.vocab import GETokConfig

GRID4 = {"grid": 4, "rounds": 0, "offset_levels": 3, "schedule": "halving", "mode": "grid"}
CFG4 = GETokConfig(**GRID4)
ID0 = 1000  # GETok ids in these tests: 1000 + position in cfg.tokens(); ordinary text ids are < 1000
ID_TO_TOKEN = {ID0 + k: t for k, t in enumerate(CFG4.tokens())}
TOKEN_TO_ID = {t: k for k, t in ID_TO_TOKEN.items()}


def ids_of(text):
    """Token ids a real tokenizer with GETok special tokens would give: one id per GETok token, 7 for the rest."""
    from llava_getok.vocab import TOKEN_RE

    out, end = [], 0
    for m in TOKEN_RE.finditer(text):
        out += [7] * len(text[end : m.start()].split()) + [TOKEN_TO_ID[m.group(0)]]
        end = m.end()
    return out + [7] * len(text[end:].split())


def getok(task="rec", shapes=(), size=(200, 100), frame="pad", config=GRID4, mask=None):
    g = {"task": task, "frame": frame, "size": list(size), "config": config,
         "shapes": [{"kind": k, "points": p} for k, p in shapes]}
    if mask is not None:
        from pycocotools import mask as mask_utils

        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        g["mask"] = {"size": rle["size"], "counts": rle["counts"].decode()}
    return json.dumps(g)


# -- pure scores ---------------------------------------------------------------------------------------------

class TestBoxScore:
    def test_single_pair_iou_plus_l1(self):
        # IoU = 0.125 / 0.25 = 0.5; L1 = mean(0, 0, 0, 0.25) = 0.0625 -> 0.5 + 0.9375
        assert box_score([[0, 0, 0.5, 0.5]], [[0, 0, 0.5, 0.25]]) == pytest.approx(1.4375)

    def test_several_objects_matched_one_to_one(self):
        a, b = [0.0, 0.0, 0.2, 0.2], [0.6, 0.6, 0.9, 0.9]
        assert box_score([b, a], [a, b]) == pytest.approx(2.0)  # order does not matter
        assert box_score([a, a], [a, b]) < 1.6  # one prediction cannot serve two objects

    def test_extra_boxes_are_penalised(self):
        a, c = [0.0, 0.0, 0.2, 0.2], [0.5, 0.5, 0.6, 0.6]
        # matched pair 2.0, divided by max(3, 1); minus 0.5 per extra box
        assert box_score([a, a, c], [a]) == pytest.approx(2.0 / 3 - 1.0)

    def test_whole_image_box_is_penalised(self):
        # IoU 0.25, L1 = mean(0, 0, 0.5, 0.5) = 0.25 -> 1.0, minus the whole-image penalty 1.0
        assert box_score([[0, 0, 1, 1]], [[0, 0, 0.5, 0.5]]) == pytest.approx(0.0)
        assert box_score([[0, 0, 1, 1]], [[0, 0, 1, 0.95]]) > 1.9  # unless the object is that large
        # pad frame, 4:3 image: the image is the band y in [0.125, 0.875]; a box on that band is whole-image
        band = (0.0, 0.125, 1.0, 0.875)
        assert box_score([band], [[0, 0.125, 0.5, 0.5]], image_box=band) == pytest.approx(
            0.25 + 1 - (0.5 + 0.375) / 4 - 1.0)  # IoU 0.1875 / 0.75, L1 mean(0, 0, 0.5, 0.375), penalty 1

    def test_miss_ranked_by_distance(self):
        gt = [[0.0, 0.0, 0.1, 0.1]]
        near, far = box_score([[0.2, 0.2, 0.3, 0.3]], gt), box_score([[0.8, 0.8, 0.9, 0.9]], gt)
        assert near == pytest.approx(1 - 0.2) and far == pytest.approx(1 - 0.8)

    def test_empty(self):
        assert box_score([], []) == 2.0
        assert box_score([], [[0, 0, 0.5, 0.5]]) == 0.0

    def test_weights_are_config(self):
        cfg = RewardConfig(box_l1=0.0, extra_box_penalty=0.0)
        assert box_score([[0, 0, 0.5, 0.5]], [[0, 0, 0.5, 0.25]], cfg) == pytest.approx(0.5)
        with pytest.raises(ValueError, match="box_iou"):
            RewardConfig(box_iou=-1)


class TestRepetition:
    def test_repeated_sentences(self):
        assert repetition_score("A cat. A cat. a  cat. A dog.") == pytest.approx(-0.5)
        assert repetition_score("One thing. Another thing.") == 0.0
        assert repetition_score("") == 0.0


class TestFormat:
    def test_think_answer_dotall(self):
        assert answer_span("<think>line one\nline two</think>\n<answer>x\ny</answer>", True) is not None

    @pytest.mark.parametrize("text", [
        "<answer>x</answer>",
        "<think>a</think><answer>x</answer><answer>y</answer>",
        "<think>a</think><think>b</think><answer>x</answer>",
        "<answer>x</answer><think>a</think>",
        "<think>a</think><answer>x</answer> trailing",
    ])
    def test_bad_structures(self, text):
        assert answer_span(text, True) is None

    def test_callable_format(self):
        reward = get_reward("format", RewardConfig(think=True), ID_TO_TOKEN)
        g = getok(shapes=[("box", [[20, 10], [120, 60]])])
        good = "<think>left one</think><answer><box><grid_0_1><grid_2_2></box></answer>"
        broken = "<think>x</think><answer><box><grid_0_1></box></answer>"  # one corner
        empty = "<think>x</think><answer>none</answer>"
        texts = [good, broken, empty, good.replace("<think>", "")]
        assert reward(texts, completion_ids=[ids_of(t) for t in texts], getok=[g] * 4) == [1.0, 0.0, 0.0, 0.0]
        assert reward.counts["unparseable"] == 2  # broken group, missing <think>


class TestStrictParsing:
    def test_lookalike_text_is_rejected(self):
        text = "<box><grid_0_1><grid_2_2></box>"
        res, why = parse_completion(text, ids_of(text), ID_TO_TOKEN, CFG4)
        assert why is None and len(res.shapes) == 1
        res, why = parse_completion(text, [7] * 12, ID_TO_TOKEN, CFG4)  # spelled with ordinary pieces
        assert res is None and why == "lookalike"

    def test_only_answer_tokens_count_with_think(self):
        text = "<think><grid_3_3></think><answer><box><grid_0_1><grid_2_2></box></answer>"
        res, why = parse_completion(text, ids_of(text), ID_TO_TOKEN, CFG4, think=True)
        assert why is None and [s.kind for s in res.shapes] == ["box"]


class TestPoints:
    def test_inside_box_and_too_many(self):
        t = Target("point", np.array([[0.2, 0.2, 0.4, 0.4]]), np.zeros((0, 2)), (10, 10), "orig", None, CFG4)
        inside = inside_target([[0.3, 0.3], [0.9, 0.9]], t)
        assert inside.tolist() == [True, False]
        assert points_score(inside, n_targets=1) == pytest.approx(0.5 - 0.25)
        assert points_score([], n_targets=1) == 0.0

    def test_inside_mask_uses_frame(self):
        mask = np.zeros((100, 200), dtype=bool)
        mask[40:60, 150:200] = True  # pixels x 150..199, y 40..59
        t = target_from_getok(getok("point", [("point", [[175, 50]])], mask=mask))
        # pad frame: S = 200, y offset 50 -> pixel (175, 50) is (0.875, 0.5); (0.875, 0.1) is on the padding
        assert inside_target([[0.875, 0.5], [0.5, 0.5], [0.875, 0.1]], t).tolist() == [True, False, False]


class TestRefine:
    def test_per_point_rules(self):
        inside = lambda p: np.asarray(p).reshape(-1, 2)[:, 0] < 0.5  # noqa: E731
        pts = [(0.3, 0.5), (0.9, 0.5), (0.45, 0.5), (0.55, 0.5), (0.7, 0.5)]
        offs = [None, None, (1, 0), (-1, 0), (0, 0)]
        # invalid delete (a neighbour is inside) 0; valid delete +1; moved out -1; moved in +1; kept outside 0
        assert refine_point_scores(pts, offs, inside, 0.125, 1) == [0, 1, -1, 1, 0]

    def _target(self, box):
        return Target("refine", np.array([box], dtype=float), np.zeros((0, 2)), (1, 1), "orig", None,
                      GETokConfig(grid=4, mode="refine"))

    def test_box_refinement_hand_computed(self):
        first = [Shape("box", ((0.125, 0.125), (0.625, 0.625)))]  # <box><grid_0_0><grid_2_2></box>
        t = self._target([0.25, 0.125, 0.625, 0.75])  # step 1/8: corners reachable exactly
        iou_first = 0.1875 / 0.296875
        both = refine_score(first, [Refinement("box", ((1, 0), (0, 1)))], t)
        assert both == pytest.approx(1.0 + (1.0 - iou_first))
        # corner 1 lands (+1); corner 2 moves away while outside (0); refined IoU 0.6
        half = refine_score(first, [Refinement("box", ((1, 0), (0, -1)))], t)
        assert half == pytest.approx(0.5 + (0.6 - iou_first))

    def test_moving_out_costs(self):
        first = [Shape("box", ((0.125, 0.125), (0.625, 0.625)))]
        t = self._target([0.125, 0.125, 0.625, 0.625])
        # corner 1 moved out (-1), corner 2 kept inside (+1): mean 0; IoU 1 -> 0.75
        assert refine_score(first, [Refinement("box", ((1, 0), (0, 0)))], t) == pytest.approx(-0.25)

    def test_callable_refine_structure_mismatch_scores_zero(self):
        g = getok("refine", [("box", [[0.25 * 200, 0.125 * 200 - 50], [0.625 * 200, 0.75 * 200 - 50]])],
                  config={"grid": 4, "rounds": 1, "offset_levels": 3, "schedule": "halving", "mode": "refine"})
        reward = get_reward("refine")
        fmt = get_reward("format")
        first = "<box><grid_0_0><grid_2_2></box>"
        texts = ["<offset><box><off_1_0><off_0_1></box></offset>", "<offset><box><off_1_0></box></offset>"]
        out = reward(texts, getok=[g, g], first_answer=[first, first])
        assert out[0] == pytest.approx(1.0 + 1.0 - 0.1875 / 0.296875) and out[1] == 0.0
        assert fmt(texts, getok=[g, g], first_answer=[first, first]) == [1.0, 0.0]


class TestMask:
    def test_mask_reward_on_a_real_image(self, shared_data):
        from PIL import Image

        from llava_getok.geometry import points_from_frame
        from llava_getok.masks import SuperpixelGenerator

        path = sorted((shared_data / "coco_mini" / "val2017").glob("*.jpg"))[0]
        rgb = np.asarray(Image.open(path).convert("RGB"))
        h, w = rgb.shape[:2]
        gen = SuperpixelGenerator()
        labels = gen.segments(rgb)
        # anchors of cells (1, 2) and (3, 1) on a 4 x 4 grid, in pixels of the original image (pad frame)
        (xa, ya), (xb, yb) = np.floor(points_from_frame([[0.375, 0.625], [0.875, 0.375]], (w, h), "pad")).astype(int)
        assert labels[ya, xa] != labels[yb, xb]
        gt = labels == labels[ya, xa]  # the ground truth is exactly the proposal at the first anchor
        g = getok("res", [("mask", [[int(xa), int(ya)]])], size=(w, h), mask=gt)
        reward = get_reward("mask", generator=gen)
        texts = ["<seg><grid_1_2></seg>", "<seg><grid_3_1></seg>", "<seg><grid_1_2><grid_3_1></seg>"]
        out = reward(texts, getok=[g] * 3, image_path=[str(path)] * 3)
        both = gt.sum() / (gt | (labels == labels[yb, xb])).sum()
        assert out == [1.0, 0.0, pytest.approx(both)]


# -- trl callables -------------------------------------------------------------------------------------------

class TestCallables:
    def test_box_reward_reads_pixels_through_the_frame(self):
        # 200 x 100 image, pad frame: S = 200, y offset 50 -> GT (0.1, 0.3, 0.6, 0.55)
        g = getok(shapes=[("box", [[20, 10], [120, 60]])])
        text = "<box><grid_0_1><grid_2_2></box>"  # decodes to (0.125, 0.375, 0.625, 0.625)
        iou = (0.475 * 0.175) / (0.125 + 0.125 - 0.475 * 0.175)
        l1 = (0.025 + 0.075 + 0.025 + 0.075) / 4
        logged = {}
        out = get_reward("box", id_to_token=ID_TO_TOKEN)(
            [text, "nothing"], completion_ids=[ids_of(text), [7]], getok=[g, g],
            log_metric=lambda k, v: logged.setdefault(k, v))
        assert out[0] == pytest.approx(iou + 1 - l1) and out[1] == 0.0
        assert logged == {"box/unparseable": 0.0}  # "nothing": parsed fine, no box: scores 0 by the formula

    def test_abstains_on_other_tasks(self):
        g = getok("res", [("mask", [[10, 10]])], mask=np.ones((100, 200), bool))
        assert get_reward("box")(["x"], getok=[g]) == [None]

    def test_registry_and_pickling(self):
        r = get_reward("grounding", RewardConfig(box_l1=0.5), ID_TO_TOKEN)
        r2 = pickle.loads(pickle.dumps(r))
        assert r2.__name__ == "grounding" and r2.config.box_l1 == 0.5
        with pytest.raises(ValueError, match="valid: box, format"):
            get_reward("iou")

    def test_bad_getok_names_the_field(self):
        with pytest.raises(ValueError, match="lacks 'frame'"):
            get_reward("box")(["x"], getok=[json.dumps({"task": "rec", "size": [1, 1], "shapes": []})])
