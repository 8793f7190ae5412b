"""Grammar-constrained decoding: whatever the logits, the output parses (by ids) without errors."""
import pytest
import torch

from llava_getok.formats import BinsFormat
from llava_getok.generation import GETokLogitsProcessor, getok_token_ids
from llava_getok.grammar import GETokGrammar
from llava_getok.parse import parse_ids
from llava_getok.vocab import GETokConfig

CONFIGS = [
    GETokConfig(grid=4, mode="grid"),
    GETokConfig(grid=4, rounds=1),
    GETokConfig(grid=3, rounds=2, offset_levels=5),
    GETokConfig(grid=4, mode="refine"),
]
N_TEXT, EOS, BOS = 20, 2, 1


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small tensors: threads only fight over the shared cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def fake_vocab(cfg):
    """ids 0..N_TEXT-1 are text (2 = EOS, 1 = BOS), then the GETok tokens, then 3 padding rows."""
    ids = {t: N_TEXT + k for k, t in enumerate(cfg.tokens())}
    return ids, {v: k for k, v in ids.items()}, N_TEXT + len(ids) + 3


def sample(proc, vocab, rows, steps, seed, getok_bias=1.0):
    """Sample ``steps`` tokens per row from random logits through ``proc``, like generate does
    (finished rows are padded with 0); return each row's tokens up to EOS and whether it wrote EOS."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.zeros(rows, 3, dtype=torch.long)  # a 3-token prompt
    done = torch.zeros(rows, dtype=torch.bool)
    for _ in range(steps):
        scores = torch.randn(rows, vocab, generator=gen) * 3
        scores[:, N_TEXT:] += getok_bias  # visit the GETok states often
        gumbel = -torch.log(-torch.log(torch.rand(rows, vocab, generator=gen)))
        nxt = (proc(x, scores) + gumbel).argmax(-1)  # a sample from softmax(scores) (Gumbel-max)
        nxt = torch.where(done, torch.zeros_like(nxt), nxt)
        done |= nxt == EOS
        x = torch.cat([x, nxt[:, None]], 1)
    out = []
    for row in x[:, 3:].tolist():
        out.append((row[: row.index(EOS)], True) if EOS in row else (row, False))
    return out


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.mode}-R{c.rounds}-m{c.offset_levels}")
@pytest.mark.parametrize("only", [None, "box", "point", "mask", "polyline", "shape"])
def test_random_logits_always_parse(cfg, only):
    ids, id_to_tok, vocab = fake_vocab(cfg)
    n_shapes = 0
    for budget in (12, 40):
        proc = GETokLogitsProcessor(ids, cfg, EOS, vocab - 3, never_ids=[BOS], only=only, max_new_tokens=budget)
        for row, ended in sample(proc, vocab, rows=48, steps=budget, seed=budget):
            assert BOS not in row and all(i < vocab - 3 for i in row)
            r = parse_ids(row, id_to_tok, cfg)
            assert r.errors == [], [id_to_tok.get(i, i) for i in row]
            n_shapes += len(r.shapes)
            if only:  # exactly one shape of the asked kind, then EOS
                kinds = [s.kind for s in r.shapes]
                assert len(kinds) == 1, [id_to_tok.get(i, i) for i in row]
                if only != "shape":
                    assert kinds == [only]
                assert all(i >= N_TEXT for i in row)  # no free text around a shape-only answer
    assert n_shapes > 20  # the test visited the grammar, not just free text


def test_refinement_answers_parse_as_refinements():
    cfg = GETokConfig(grid=4, mode="refine")
    ids, id_to_tok, vocab = fake_vocab(cfg)
    proc = GETokLogitsProcessor(ids, cfg, EOS, vocab - 3, only="refinement", max_new_tokens=30)
    n = 0
    for row, _ in sample(proc, vocab, rows=64, steps=30, seed=1):
        r = parse_ids(row, id_to_tok, cfg)
        assert r.errors == [] and r.shapes == []
        assert id_to_tok[row[0]] == "<offset>" and id_to_tok[row[-1]] == "</offset>"
        n += len(r.refinements)
    assert n > 20


def test_the_processor_masks_what_the_grammar_forbids():
    cfg = GETokConfig(grid=4, rounds=1)
    ids, _, vocab = fake_vocab(cfg)
    proc = GETokLogitsProcessor(ids, cfg, EOS, vocab - 3, never_ids=[BOS])
    prompt = torch.tensor([[5, 6]])
    out = proc(prompt, torch.zeros(1, vocab))
    allowed = set(torch.isfinite(out[0]).nonzero().flatten().tolist())
    text = set(range(N_TEXT)) - {BOS}
    opens = {ids["<box>"], ids["<seg>"], ids["<pl>"]}
    assert allowed == text | opens | {ids[t] for t in cfg.grid_tokens}
    # after <box>: grid tokens only; after a grid token in inline mode: offsets only
    x = torch.cat([prompt, torch.tensor([[ids["<box>"]]])], 1)
    out = proc(x, torch.zeros(1, vocab))
    assert set(torch.isfinite(out[0]).nonzero().flatten().tolist()) == {ids[t] for t in cfg.grid_tokens}
    x = torch.cat([x, torch.tensor([[ids["<grid_1_1>"]]])], 1)
    out = proc(x, torch.zeros(1, vocab))
    assert set(torch.isfinite(out[0]).nonzero().flatten().tolist()) == {ids[t] for t in cfg.offset_tokens}
    # a new generate call (a shorter sequence) starts again from free text
    out = proc(prompt, torch.zeros(1, vocab))
    assert set(torch.isfinite(out[0]).nonzero().flatten().tolist()) == allowed


def test_budget_forces_the_open_group_to_close():
    cfg = GETokConfig(grid=4, rounds=1)
    ids, id_to_tok, vocab = fake_vocab(cfg)
    proc = GETokLogitsProcessor(ids, cfg, EOS, vocab - 3, max_new_tokens=7)
    x = torch.tensor([[5]])
    written = []
    for tok in ["<box>", "<grid_0_0>", "<off_0_0>", "<grid_1_1>", "<off_0_0>"]:
        scores = torch.zeros(1, vocab)
        scores[0, ids[tok]] = 10
        nxt = int(proc(x, scores).argmax())
        written.append(id_to_tok.get(nxt, nxt))
        x = torch.cat([x, torch.tensor([[nxt]])], 1)
    assert written == ["<box>", "<grid_0_0>", "<off_0_0>", "<grid_1_1>", "<off_0_0>"]
    # 2 tokens left: the model wants another grid token, but only </box> still fits
    scores = torch.zeros(1, vocab)
    scores[0, ids["<grid_2_2>"]] = 10
    assert id_to_tok[int(proc(x, scores).argmax())] == "</box>"


def test_every_state_allows_something_and_can_finish():
    for cfg in CONFIGS:
        for only in [None, "box", "point", "mask", "polyline", "shape"] + (["refinement"] * (cfg.mode == "refine")):
            g = GETokGrammar(cfg, only)
            for budget in (None, 1, 2, 3, 5):
                assert all(any(row) for row in g.allowed(budget)), (cfg, only, budget)
            assert all(d is not None for d in g.dist)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="only must be one of"):
        GETokGrammar(GETokConfig(), only="circle")
    with pytest.raises(ValueError, match="refine mode"):
        GETokGrammar(GETokConfig(), only="refinement")


def test_from_tokenizer_needs_the_getok_tokens(tiny_tokenizer_dir):
    from transformers import AddedToken, AutoTokenizer

    cfg = GETokConfig(grid=4, rounds=1)
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir, use_fast=False)
    with pytest.raises(ValueError, match="lacks 34 of the 34 GETok tokens"):
        GETokLogitsProcessor.from_tokenizer(tok, cfg)
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in cfg.tokens()], special_tokens=True)
    ids = getok_token_ids(tok, cfg)
    proc = GETokLogitsProcessor.from_tokenizer(tok, cfg, max_new_tokens=10)
    classes = proc.token_classes(len(tok) + 5)
    assert classes[tok.eos_token_id] == 1 and classes[tok.bos_token_id] == classes[-1] == 13
    assert classes[ids["<grid_3_3>"]] == 2 and classes[ids["</box>"]] == 6


def classes_of(text, cfg):
    """Token classes of a GETok answer: each GETok token its class, each run of free text one "text"."""
    from llava_getok.vocab import TOKEN_RE

    out, end = [], 0
    for m in TOKEN_RE.finditer(text):
        if text[end:m.start()]:
            out.append("text")
        tok = m.group(0)
        out.append("grid" if m.group("i") else "off" if m.group("dx") else "delete" if m.group("delete") else tok)
        end = m.end()
    if text[end:]:
        out.append("text")
    return out + ["eos"]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.mode}-R{c.rounds}-m{c.offset_levels}")
def test_the_grammar_accepts_every_answer_the_codec_writes(cfg):
    """The constraint must never block a training target: every rendered answer walks the automaton."""
    import numpy as np

    from llava_getok.codec import Refinement, Shape, encode_refinement, render

    rng = np.random.default_rng(0)
    free = GETokGrammar(cfg)
    for _ in range(200):
        shapes = []
        for kind in rng.choice(["point", "box", "polyline", "mask"], size=rng.integers(1, 4)):
            n = {"point": 1, "box": 2}.get(kind, int(rng.integers(1, 6)))
            pts = rng.random((n, 2))
            if kind == "box":
                pts = np.sort(pts, axis=0)
            shapes.append(Shape(kind, tuple(map(tuple, pts))))
        text = "Here: " + render(shapes, cfg) + " done."
        states = free.walk(classes_of(text, cfg))
        assert free.states[states[-1]].ctx == "done"
        one = GETokGrammar(cfg, only=shapes[0].kind)
        assert one.states[one.walk(classes_of(render(shapes[:1], cfg), cfg))[-1]].ctx == "done"
        if cfg.mode == "refine":
            refs = [Refinement(s.kind, tuple(None if rng.random() < 0.2 else (int(rng.integers(-1, 2)), 0) for _ in s.points))
                    for s in shapes]
            answer = encode_refinement(refs, cfg)
            for g in (free, GETokGrammar(cfg, only="refinement")):
                assert g.states[g.walk(classes_of(answer, cfg))[-1]].ctx == "done"


@pytest.mark.parametrize("fmt", [GETokConfig(grid=4, rounds=1), BinsFormat(bins=16)], ids=["getok", "bins"])
@pytest.mark.parametrize("template", ["getok_v1", "getok_mistral_instruct", "llava_v1"])
def test_a_shape_only_answer_may_start_as_training_tokenised_it(tiny_tokenizer_dir, fmt, template):
    """LLaVA's templates put a space between the assistant's role and its reply, and with the location tokens split
    off, training sees it as a token of its own ("▁") before the answer's first location token. Constrained
    decoding must allow the ids training saw, in order: forcing the location token where the model learned to
    write "▁" scored a model that boxes every held-out shape (Acc@0.5 1.00 once allowed) at 0.07 with bins."""
    import numpy as np
    from transformers import AddedToken, AutoTokenizer

    import llava_getok
    from llava.conversation import conv_templates
    from llava_getok.formats import encode_boxes
    from llava_getok.llava import inputs

    llava_getok.register()
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir, use_fast=False, legacy=False)
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in fmt.tokens()], special_tokens=True)
    question = {"from": "human", "value": "<image>\nWhere is the dog?"}
    answer = encode_boxes(np.asarray([[0.1, 0.2, 0.6, 0.7]]), fmt)[0]
    conv = conv_templates[template].copy()
    conv.append_message(conv.roles[0], question["value"])
    conv.append_message(conv.roles[1], answer)
    trained = inputs.prompt_ids(conv.get_prompt(), tok)  # how LLaVA's preprocess tokenises a conversation
    prompt = inputs.prompt_ids(inputs.render_prompt([question], template), tok)
    assert trained[: len(prompt)] == prompt
    location_ids = set(getok_token_ids(tok, fmt).values())
    last = max(k for k, i in enumerate(trained) if i in location_ids)
    reply = trained[len(prompt): last + 1]
    assert reply[0] not in location_ids and tok.convert_ids_to_tokens(reply[0]) == "▁"  # what the fix is for
    proc = GETokLogitsProcessor.from_tokenizer(tok, fmt, only="box", max_new_tokens=16)
    scores = torch.zeros(1, len(tok))
    for k, want in enumerate(reply + [tok.eos_token_id]):
        allowed = proc(torch.tensor([prompt + reply[:k]]), scores)[0]
        assert torch.isfinite(allowed[want]), f"step {k}: {tok.convert_ids_to_tokens(want)!r} is forbidden"
    proc.reset()  # ... the space once: not a second time
    proc(torch.tensor([prompt]), scores)
    assert not torch.isfinite(proc(torch.tensor([prompt + reply[:1]]), scores)[0][reply[0]])


def test_a_refinement_may_start_as_training_tokenised_it(tiny_tokenizer_dir):
    """Refine mode's second answer follows the first answer's plan position by position; the template's space
    before it (its own token in training) shifts the plan by one for that row instead of being forbidden."""
    import numpy as np
    from transformers import AddedToken, AutoTokenizer

    import llava_getok
    from llava.conversation import conv_templates
    from llava_getok.codec import Refinement, Shape, encode_refinement, render
    from llava_getok.generation import RefinementLogitsProcessor
    from llava_getok.llava import inputs
    from llava_getok.records import REFINE_PROMPT

    llava_getok.register()
    cfg = GETokConfig(grid=4, rounds=1, mode="refine")
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir, use_fast=False, legacy=False)
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in cfg.tokens()], special_tokens=True)
    shapes = [Shape("box", ((0.1, 0.2), (0.6, 0.7)))]
    first = render(shapes, cfg.with_mode("grid"))
    refinement = encode_refinement([Refinement("box", ((1, 0), None))], cfg)
    turns = [{"from": "human", "value": "<image>\nWhere is the dog?"}, {"from": "gpt", "value": first},
             {"from": "human", "value": REFINE_PROMPT.format(answer=first)}]
    conv = conv_templates["getok_mistral_instruct"].copy()
    for t in turns + [{"from": "gpt", "value": refinement}]:
        conv.append_message(conv.roles[0] if t["from"] == "human" else conv.roles[1], t["value"])
    trained = inputs.prompt_ids(conv.get_prompt(), tok)
    prompt = inputs.prompt_ids(inputs.render_prompt(turns, "getok_mistral_instruct"), tok)
    assert trained[: len(prompt)] == prompt
    location_ids = set(getok_token_ids(tok, cfg).values())
    reply = trained[len(prompt): max(k for k, i in enumerate(trained) if i in location_ids) + 1]
    assert tok.convert_ids_to_tokens(reply[0]) == "▁" and reply[1] not in (tok.eos_token_id,)
    proc = RefinementLogitsProcessor.from_tokenizer(tok, cfg, [shapes])
    scores = torch.zeros(1, len(tok))
    for k, want in enumerate(reply + [tok.eos_token_id]):
        allowed = proc(torch.tensor([prompt + reply[:k]]), scores)[0]
        assert torch.isfinite(allowed[want]), f"step {k}: {tok.convert_ids_to_tokens(want)!r} is forbidden"
    assert len(reply) + 1 <= proc.max_new_tokens  # the budget holds the space, the plan and EOS
    # ... and a row that starts without the space follows the plan from its first token
    proc = RefinementLogitsProcessor.from_tokenizer(tok, cfg, [shapes])
    for k, want in enumerate(reply[1:] + [tok.eos_token_id]):
        allowed = proc(torch.tensor([prompt + reply[1:k + 1]]), scores)[0]
        assert torch.isfinite(allowed[want]), f"step {k}: {tok.convert_ids_to_tokens(want)!r} is forbidden"
