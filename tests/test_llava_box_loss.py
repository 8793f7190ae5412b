"""Box-token loss (spec section 7) against a hand computation in plain Python (math module only)."""
import math

import numpy as np
import pytest
import torch

from llava_getok.training.box_loss import TokenTable, box_token_loss, find_boxes
from llava_getok.training.loss_parts import Targets, gaussian_targets
from llava_getok.vocab import GETokConfig

CFG = GETokConfig(grid=2, rounds=1)  # 4 grid tokens, 9 offset tokens
BASE = 5  # ids 0..4 are ordinary tokens
TABLE = TokenTable.from_ids(CFG, list(range(BASE, BASE + len(CFG.tokens()))))
V = BASE + len(CFG.tokens())


def tid(token):
    return BASE + CFG.tokens().index(token)


def one_box_labels():
    # unshifted labels: position t+1 is predicted by logits at t
    toks = ["<box>", "<grid_0_0>", "<off_1_0>", "<grid_1_1>", "<off_0_-1>", "</box>"]
    return torch.tensor([[-100, 1] + [tid(t) for t in toks] + [2]])


def softmax(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


def hand_soft_ce(row, ids, coords, target, sigma):
    p = softmax([row[i] for i in ids])
    if sigma == 0:
        q = [1.0 if k == target else 0.0 for k in range(len(ids))]
    else:
        w = [math.exp(-((c[0] - coords[target][0]) ** 2 + (c[1] - coords[target][1]) ** 2) / (2 * sigma**2)) for c in coords]
        q = [v / sum(w) for v in w]
    return -sum(qk * math.log(pk) for qk, pk in zip(q, p)), p, q


GRID_XY = [(0, 0), (1, 0), (0, 1), (1, 1)]
OFF_XY = list(CFG.offset_values)


def test_grid_part_value_and_gradient_match_hand_computation():
    torch.manual_seed(0)
    labels = one_box_labels()
    logits = torch.randn(1, labels.shape[1], V, dtype=torch.float64, requires_grad=True)
    parts = box_token_loss(logits, Targets.of(labels), TABLE, sigma=0.8, offset_sigma=0.0, with_box=False)
    rows = logits.detach()[0].tolist()
    # targets at label positions 3 (grid_0_0), 4 (off_1_0), 5 (grid_1_1), 6 (off_0_-1): predicted by logits t-1
    grid_ids = [tid(t) for t in CFG.grid_tokens]
    off_ids = [tid(t) for t in CFG.offset_tokens]
    cases = [(2, grid_ids, GRID_XY, 0, 0.8), (3, off_ids, OFF_XY, OFF_XY.index((1, 0)), 0.0),
             (4, grid_ids, GRID_XY, 3, 0.8), (5, off_ids, OFF_XY, OFF_XY.index((0, -1)), 0.0)]
    terms = [hand_soft_ce(rows[t], ids, xy, k, s) for t, ids, xy, k, s in cases]
    assert parts["n_grid"] == 4
    assert float(parts["grid"].detach()) == pytest.approx(sum(t[0] for t in terms) / 4, rel=1e-12)

    parts["grid"].backward()
    expect = torch.zeros_like(logits)
    for (t, ids, _, _, _), (_, p, q) in zip(cases, terms):
        for col, pk, qk in zip(ids, p, q):
            expect[0, t, col] = (pk - qk) / 4  # d(soft CE)/d(logit) = p - q, averaged over 4 positions
    assert torch.allclose(logits.grad, expect, atol=1e-12)


def hand_box_loss(rows):
    n, step = 2, CFG.step(1)
    anchors = [((i + 0.5) / n, (j + 0.5) / n) for i, j in GRID_XY]
    grid_ids = [tid(t) for t in CFG.grid_tokens]
    off_ids = [tid(t) for t in CFG.offset_tokens]

    def corner(tg, to, cell, off):
        p, q = softmax([rows[tg][i] for i in grid_ids]), softmax([rows[to][i] for i in off_ids])
        x = sum(pk * a[0] for pk, a in zip(p, anchors)) + step * sum(qk * o[0] for qk, o in zip(q, OFF_XY))
        y = sum(pk * a[1] for pk, a in zip(p, anchors)) + step * sum(qk * o[1] for qk, o in zip(q, OFF_XY))
        return (x, y), (anchors[cell][0] + step * off[0], anchors[cell][1] + step * off[1])

    (p1, t1), (p2, t2) = corner(2, 3, 0, (1, 0)), corner(4, 5, 3, (0, -1))
    pred, true = (*p1, *p2), (*t1, *t2)
    l1 = sum(abs(a - b) for a, b in zip(pred, true)) / 4  # corner by corner, as predicted
    pred = (min(pred[0], pred[2]), min(pred[1], pred[3]), max(pred[0], pred[2]), max(pred[1], pred[3]))  # for GIoU

    def area(b):
        return max(b[2] - b[0], 0) * max(b[3] - b[1], 0)

    inter = max(min(pred[2], true[2]) - max(pred[0], true[0]), 0) * max(min(pred[3], true[3]) - max(pred[1], true[1]), 0)
    union = area(pred) + area(true) - inter
    hull = (max(pred[2], true[2]) - min(pred[0], true[0])) * (max(pred[3], true[3]) - min(pred[1], true[1]))
    giou = inter / union - (hull - union) / hull
    return l1 + 1 - giou


def test_box_part_matches_hand_computation_and_has_a_gradient():
    torch.manual_seed(1)
    labels = one_box_labels()
    logits = torch.randn(1, labels.shape[1], V, dtype=torch.float64, requires_grad=True)
    parts = box_token_loss(logits, Targets.of(labels), TABLE, sigma=1.0)
    assert parts["n_box"] == 1
    assert float(parts["box"].detach()) == pytest.approx(hand_box_loss(logits.detach()[0].tolist()), rel=1e-6)
    parts["box"].backward()
    # numerical derivative of the hand formula for one grid logit of the first corner
    eps, col = 1e-6, tid("<grid_1_0>")
    rows = logits.detach()[0].tolist()
    up = [r[:] for r in rows]
    up[2][col] += eps
    dn = [r[:] for r in rows]
    dn[2][col] -= eps
    numeric = (hand_box_loss(up) - hand_box_loss(dn)) / (2 * eps)
    assert float(logits.grad[0, 2, col]) == pytest.approx(numeric, rel=1e-4, abs=1e-9)
    assert logits.grad[0, :2].abs().sum() == 0 and logits.grad[0, 6:].abs().sum() == 0


def test_soft_target_peaks_at_the_target_cell_and_sigma_zero_is_one_hot():
    cfg = GETokConfig(grid=5)
    table = TokenTable.from_ids(cfg, list(range(len(cfg.tokens()))))
    for target in (0, 7, 12, 24):
        q = gaussian_targets([target], 5, 1.0)[0]
        assert int(q.argmax()) == target and q.sum().item() == pytest.approx(1.0)
        i, j = target % 5, target // 5
        neighbours = [q[jj * 5 + ii] for ii, jj in ((i + 1, j), (i, j + 1)) if ii < 5 and jj < 5]
        far = q[(4 - j) * 5 + (4 - i)] if (i, j) != (2, 2) else q[0]
        assert all(n > far for n in neighbours)
    assert (gaussian_targets([3], 5, 0.0)[0] == np.eye(25)[3]).all()


def test_no_getok_targets_gives_zero_parts_and_malformed_boxes_are_skipped():
    labels = torch.tensor([[-100, 1, 2, 3, 4]])
    logits = torch.randn(1, 5, V)
    parts = box_token_loss(logits, Targets.of(labels), TABLE)
    assert float(parts["grid"].detach()) == 0 and float(parts["box"]) == 0 and parts["n_box"] == 0
    one_corner = torch.tensor([[-100, tid("<box>"), tid("<grid_0_0>"), tid("</box>")]])
    assert len(find_boxes(Targets.of(one_corner), TABLE).corners) == 0
    assert box_token_loss(torch.randn(1, 4, V), Targets.of(one_corner), TABLE)["n_box"] == 0


def walk_boxes(labels, table):
    """Reference: a plain walk over each row; (row, [[grid pos, offset pos...], [corner 2]]) per valid box."""
    grid, off = set(table.grid_ids.tolist()), set(table.offset_ids.tolist())
    out = []
    for b, row in enumerate(labels.tolist()):
        t = 0
        while t < len(row):
            if row[t] != table.box_open:
                t += 1
                continue
            t += 1
            corners, ok = [], True
            while t < len(row) and row[t] not in (table.box_close, table.box_open):
                if row[t] in grid:
                    corners.append([t])
                elif row[t] in off and corners:
                    corners[-1].append(t)
                else:
                    ok = False
                t += 1
            if t < len(row) and row[t] == table.box_close and ok and len(corners) == 2:
                out.append((b, corners))
    return out


def slots_as_walk(slots, row_len):
    boxes = []
    for k in range(0, len(slots.corners), 2):
        corners = [[int(slots.corners[k + c] % row_len)] for c in (0, 1)]
        for pos, corner, rnd in zip(slots.offsets, slots.offset_corner, slots.offset_round):
            if corner in (k, k + 1):
                corners[corner - k].append(int(pos % row_len))
                assert int(pos % row_len) == corners[corner - k][0] + rnd
        boxes.append((int(slots.corners[k] // row_len), corners))
    return boxes


def test_find_boxes_matches_a_plain_walk_on_random_label_rows():
    import random

    rng = random.Random(0)
    pieces = ["<box>", "</box>", "<grid_0_0>", "<grid_1_1>", "<off_1_0>", "<off_0_-1>", "<delete>", "<seg>"]
    found = 0
    for _ in range(300):
        rows = []
        for _ in range(rng.randint(1, 4)):
            row = []
            while len(row) < 24:  # mostly well-formed boxes, with random damage
                box = ["<box>", "<grid_0_0>", "<off_1_0>", "<grid_1_1>", "<off_0_-1>", "</box>"]
                if rng.random() < 0.4:
                    box.insert(rng.randrange(len(box) + 1), rng.choice(pieces))
                if rng.random() < 0.2:
                    del box[rng.randrange(len(box))]
                row += [tid(t) for t in box] + [rng.choice([-100, 1, 2])]
            rows.append(row[:24])
        labels = torch.tensor(rows)
        want = walk_boxes(labels, TABLE)
        assert slots_as_walk(find_boxes(Targets(labels.numpy().reshape(-1), labels.shape[1]), TABLE), labels.shape[1]) == want
        found += len(want)
    assert found > 300  # the damage leaves most boxes valid: the comparison is not between empty lists


def test_loss_over_a_batch_equals_the_mean_of_its_rows():
    torch.manual_seed(2)
    rows = [one_box_labels()[0].tolist() + [-100] * 3,
            [-100, 1, tid("<box>"), tid("<grid_1_0>"), tid("<off_0_0>"), tid("<grid_1_1>"), tid("<off_1_1>"), tid("</box>"), 2, -100, -100, -100],
            [-100, tid("<box>"), tid("<grid_0_1>"), tid("<off_-1_0>"), tid("<grid_1_1>"), tid("<off_0_0>"), tid("</box>"), 2, 1, 1, -100, -100]]
    labels = torch.tensor(rows)
    logits = torch.randn(3, labels.shape[1], V, dtype=torch.float64)
    whole = box_token_loss(logits, Targets.of(labels), TABLE, sigma=1.0, offset_sigma=0.5)
    each = [box_token_loss(logits[r:r + 1], Targets.of(labels[r:r + 1]), TABLE, sigma=1.0, offset_sigma=0.5) for r in range(3)]
    assert whole["n_box"] == 3 and whole["n_grid"] == 12
    assert float(whole["box"]) == pytest.approx(sum(float(e["box"]) for e in each) / 3, rel=1e-12)
    assert float(whole["grid"]) == pytest.approx(sum(float(e["grid"]) for e in each) / 3, rel=1e-12)


def test_hand_written_gradient_passes_gradcheck_with_several_boxes_and_rounds():
    """The loss computes its gradient by hand (no autograd chain): check it against numerical derivatives
    for a batch with two boxes in one row, two offset rounds, soft grid and offset targets."""
    cfg = GETokConfig(grid=3, rounds=2)
    table = TokenTable.from_ids(cfg, list(range(4, 4 + len(cfg.tokens()))))
    of = dict(zip(cfg.tokens(), range(4, 4 + len(cfg.tokens()))))
    box = lambda a, b: [of[t] for t in ("<box>", a, "<off_1_0>", "<off_0_-1>", b, "<off_-1_1>", "<off_0_0>", "</box>")]  # noqa: E731
    labels = torch.tensor([[-100, 1] + box("<grid_0_0>", "<grid_2_1>") + box("<grid_1_1>", "<grid_2_2>") + [2],
                           [-100] * 10 + box("<grid_0_1>", "<grid_1_2>") + [2]])
    V = 4 + len(cfg.tokens())
    torch.manual_seed(3)
    logits = torch.randn(*labels.shape, V, dtype=torch.float64, requires_grad=True)

    def both(x):
        p = box_token_loss(x, Targets.of(labels), table, sigma=0.7, offset_sigma=0.6)
        assert p["n_box"] == 3
        return torch.stack([p["grid"], p["box"]])

    assert torch.autograd.gradcheck(both, (logits,), eps=1e-6, atol=1e-7, fast_mode=True)


def test_ids_out_of_order_give_the_same_loss_as_one_run_of_ids():
    """The loss reads the GETok columns as a slice when their ids are one run (as register() adds them) and
    gathers them otherwise (a tokenizer that already held some of the tokens): both give one result."""
    n = len(CFG.tokens())
    perm = np.random.default_rng(0).permutation(n)
    shuffled = TokenTable.from_ids(CFG, [BASE + int(k) for k in perm])
    assert shuffled.lookup._run is None and TABLE.lookup._run is not None
    to_shuffled = np.arange(V)
    to_shuffled[BASE:] = BASE + perm  # token k of CFG.tokens(): id BASE + k in TABLE, BASE + perm[k] in shuffled
    labels = one_box_labels()
    labels2 = torch.where(labels >= 0, torch.from_numpy(to_shuffled)[labels.clamp(min=0)], labels)
    torch.manual_seed(1)
    logits = torch.randn(1, labels.shape[1], V, dtype=torch.float64, requires_grad=True)
    logits2 = torch.zeros_like(logits.detach())
    logits2[..., torch.from_numpy(to_shuffled)] = logits.detach()
    logits2.requires_grad_()
    a, b = box_token_loss(logits, Targets.of(labels), TABLE), box_token_loss(logits2, Targets.of(labels2), shuffled)
    assert a["n_box"] == b["n_box"] == 1
    for k in ("grid", "box"):
        assert float(a[k].detach()) == pytest.approx(float(b[k].detach()), rel=1e-12)
    (a["grid"] + a["box"]).backward()
    (b["grid"] + b["box"]).backward()
    assert torch.allclose(logits.grad, logits2.grad[..., torch.from_numpy(to_shuffled)], rtol=1e-10, atol=1e-14)


# -- the bins format's 1D analogue (llava_getok.training.bins_loss) ----------------------------------------------------

def reference_bins_loss(logits, labels, ids, bins, sigma):
    """The 1D loss written plainly with torch autograd: soft cross-entropy against a 1D Gaussian over bins at every
    location target, and L1 + 1 - GIoU of each box's expected coordinates (a box: 4 adjacent location targets)."""
    targets = labels[:, 1:].reshape(-1)
    rows = logits[:, :-1].reshape(-1, logits.shape[-1])
    at = [k for k, t in enumerate(targets.tolist()) if t in ids]
    logp = torch.log_softmax(rows[at][:, ids], -1)
    target_bin = torch.tensor([ids.index(int(targets[k])) for k in at], dtype=torch.float64)
    q = torch.exp(-((torch.arange(bins)[None] - target_bin[:, None]) ** 2) / (2 * sigma**2))
    ce = -(q / q.sum(1, keepdim=True) * logp).sum() / len(at)
    centres = (torch.arange(bins, dtype=torch.float64) + 0.5) / bins
    runs, run = [], []
    for k in range(len(targets) + 1):
        if k < len(targets) and int(targets[k]) in ids and (not run or run[-1] == k - 1):
            run.append(k)
            continue
        if len(run) == 4:
            runs.append(run)
        run = [k] if k < len(targets) and int(targets[k]) in ids else []
    terms = []
    for run in runs:
        pos = [at.index(k) for k in run]
        x = logp[pos].exp() @ centres
        t = centres[target_bin[pos].long()]
        lo, hi = torch.minimum(x[:2], x[2:]), torch.maximum(x[:2], x[2:])
        inter = (torch.minimum(hi, t[2:]) - torch.maximum(lo, t[:2])).clamp_min(0).prod()
        union = (hi - lo).prod() + (t[2:] - t[:2]).prod() - inter
        hull = (torch.maximum(hi, t[2:]) - torch.minimum(lo, t[:2])).prod()
        giou = inter / (union + 1e-9) - (hull - union) / (hull + 1e-9)
        terms.append((x - t).abs().mean() + 1 - giou)
    return ce, torch.stack(terms).mean(), len(runs)


def test_bins_loss_value_and_gradient_match_a_plain_autograd_computation():
    from llava_getok.formats import BinsFormat
    from llava_getok.training.bins_loss import BinsTable, bins_token_loss

    bins, base = 12, 5
    fmt = BinsFormat(bins=bins)
    ids = list(range(base, base + bins))
    loc = lambda k: base + k  # noqa: E731
    # a box (x1 y1 x2 y2), a point (2 adjacent targets: no box), text, and a second box in another row
    labels = torch.tensor([[-100, 1, loc(2), loc(3), loc(9), loc(10), 2, loc(4), loc(4), 3],
                           [-100, 1, 1, loc(0), loc(1), loc(11), loc(6), 2, -100, -100]])
    torch.manual_seed(0)
    logits = torch.randn(2, labels.shape[1], base + bins + 3, dtype=torch.float64, requires_grad=True)
    parts = bins_token_loss(logits, Targets.of(labels), BinsTable.from_ids(fmt, ids), sigma=1.5)
    ce, box, n_box = reference_bins_loss(logits, labels, ids, bins, 1.5)
    assert (parts["n_grid"], parts["n_box"], n_box) == (10, 2, 2)
    assert float(parts["grid"].detach()) == pytest.approx(float(ce.detach()), rel=1e-10)
    assert float(parts["box"].detach()) == pytest.approx(float(box.detach()), rel=1e-10)
    got = torch.autograd.grad(0.3 * parts["grid"] + 0.7 * parts["box"], logits)[0]
    want = torch.autograd.grad(0.3 * ce + 0.7 * box, logits)[0]
    assert torch.allclose(got, want, atol=1e-10)
    # sigma 0 is plain cross-entropy over the K location columns
    one_hot = bins_token_loss(logits, Targets.of(labels), BinsTable.from_ids(fmt, ids), sigma=0.0, with_box=False)
    rows = logits[:, :-1].reshape(-1, logits.shape[-1])[[1, 2, 3, 4, 6, 7, 11, 12, 13, 14]][:, base:base + bins]
    tgt = labels[:, 1:].reshape(-1)[[1, 2, 3, 4, 6, 7, 11, 12, 13, 14]] - base
    assert float(one_hot["grid"].detach()) == pytest.approx(float(torch.nn.functional.cross_entropy(rows, tgt).detach()), rel=1e-12)
    assert one_hot["n_box"] == 0 and float(one_hot["box"]) == 0.0


def test_bins_loss_is_float32_under_bf16_autocast_and_zero_without_location_targets():
    from llava_getok.formats import BinsFormat
    from llava_getok.training.bins_loss import BinsTable, bins_token_loss

    table = BinsTable.from_ids(BinsFormat(bins=8), list(range(3, 11)))
    labels = torch.tensor([[-100, 1, 3, 4, 9, 10, 2]])
    logits = torch.randn(1, 7, 12, dtype=torch.bfloat16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        parts = bins_token_loss(logits, Targets.of(labels), table)
    assert parts["grid"].dtype == torch.float32 and parts["n_box"] == 1
    (parts["grid"] + parts["box"]).backward()
    assert logits.grad.dtype == torch.bfloat16 and logits.grad[0, 1:5].abs().sum() > 0
    none = bins_token_loss(logits, Targets.of(torch.tensor([[-100, 1, 2, 2]])), table)
    assert (none["n_grid"], float(none["grid"]), float(none["box"])) == (0, 0.0, 0.0)
