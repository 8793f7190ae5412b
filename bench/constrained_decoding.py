"""Cost of grammar-constrained decoding per generated token, against an unconstrained step (target: <= 5 %).

Runs the tiny random LLaVA (llava_getok.llava.tiny, GETok tokens added) through LLaVA's own ``generate``
with an image, greedy, a fixed number of new tokens, with and without :class:`GETokLogitsProcessor`
(interleaved repeats, best run of each), and measures the time spent inside the processor during those calls
directly (robust on a busy machine, where end-to-end differences drown in noise). Also times the processor
alone on random scores for a LLaMA-sized vocabulary (32000 + the GETok tokens of a 32 x 32 grid).

    OMP_NUM_THREADS=2 .venv/bin/python bench/constrained_decoding.py [--tokens 48] [--repeats 5]

Prints a markdown table and writes it to bench/results/constrained_decoding.md.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llava_getok.atomic import write_text_atomic  # noqa: E402
from llava_getok.generation import GETokLogitsProcessor  # noqa: E402
from llava_getok.vocab import GETokConfig  # noqa: E402


def tiny_getok_llava(tmp: Path, cfg: GETokConfig):
    import llava_getok
    from llava_getok.llava import inputs as llava_inputs
    from llava_getok.llava.tiny import build_tiny_llava, train_tokenizer
    from llava_getok.training.tokens import add_getok_tokens, resize_embeddings

    llava_getok.register()
    from llava.model.builder import load_pretrained_model

    path = build_tiny_llava(tmp / "tiny-llava", train_tokenizer(tmp / "tok"))
    tokenizer, model, processor, _ = load_pretrained_model(str(path), None, "tiny-llava", device="cpu")
    add_getok_tokens(tokenizer, cfg)
    resize_embeddings(model, len(tokenizer))
    return tokenizer, model.float().eval(), processor, llava_inputs


def inputs(tokenizer, model, processor, llava_inputs, batch: int):
    from PIL import Image

    prompt = llava_inputs.render_prompt([{"from": "human", "value": "<image>\nWhere is the red circle? Answer with a box."}], "llava_v1")
    ids = torch.tensor([llava_inputs.prompt_ids(prompt, tokenizer)] * batch)
    image = Image.new("RGB", (64, 48), "red")
    with tempfile.NamedTemporaryFile(suffix=".png") as f:
        image.save(f.name)
        pixels = llava_inputs.image_tensor(f.name, processor, model.config)
    return ids, torch.stack([pixels] * batch)


class Timed:
    """Wraps a logits processor and adds up the time spent in it (inside a real generate call)."""

    def __init__(self, proc):
        self.proc, self.seconds = proc, 0.0

    def __call__(self, input_ids, scores):
        start = time.perf_counter()
        out = self.proc(input_ids, scores)
        self.seconds += time.perf_counter() - start
        return out


def time_generate(model, ids, images, n_tokens, processors, pad_id):
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), images=images, do_sample=False, num_beams=1,
                             max_new_tokens=n_tokens, min_new_tokens=n_tokens, logits_processor=processors,
                             pad_token_id=pad_id, use_cache=True)
    elapsed = time.perf_counter() - start
    assert out.shape[1] == n_tokens, out.shape
    return elapsed / n_tokens, out


def time_processor(proc, batch, vocab, calls=300):
    """Median seconds per call on random scores, the state advancing by one token per call (as in generate)."""
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(batch, vocab, generator=gen)
    x = torch.zeros(batch, 5, dtype=torch.long)
    proc(x, scores)  # first call: device tables, start states
    spent = []
    for _ in range(calls):
        start = time.perf_counter()
        out = proc(x, scores)
        spent.append(time.perf_counter() - start)
        x = torch.cat([x, out.argmax(-1, keepdim=True)], 1)
    return statistics.median(spent)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=48, help="new tokens per generate call")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "constrained_decoding.md")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    cfg = GETokConfig()  # n = 32, m = 3, R = 1, inline: 1024 + 9 + 1 + 8 tokens
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer, model, processor, llava_inputs = tiny_getok_llava(Path(tmp), cfg)
        vocab = model.get_output_embeddings().weight.shape[0]
        pad = tokenizer.pad_token_id
        for batch in map(int, args.batches.split(",")):
            ids, images = inputs(tokenizer, model, processor, llava_inputs, batch)
            time_generate(model, ids, images, 4, [], pad)  # warm-up
            # one processor, reused across calls as the predictor does; its one-time setup (tables on the
            # device, every budget level) is the first call's extra time, reported apart
            start = time.perf_counter()
            proc = Timed(GETokLogitsProcessor.from_tokenizer(tokenizer, cfg, max_new_tokens=args.tokens))
            build = time.perf_counter() - start
            time_generate(model, ids, images, args.tokens, [proc], pad)
            setup = build + proc.seconds  # construction + everything the processor did in its first call
            plain, constrained, inside = [], [], []
            for _ in range(args.repeats):  # interleaved, so drifts in machine load hit both alike
                plain.append(time_generate(model, ids, images, args.tokens, [], pad)[0])
                proc.proc.reset()
                proc.seconds = 0.0
                constrained.append(time_generate(model, ids, images, args.tokens, [proc], pad)[0])
                inside.append(proc.seconds / args.tokens)
            p, c = min(plain), min(constrained)  # the least disturbed run of each (shared machines)
            i = statistics.median(inside)
            rows.append((batch, vocab, p * 1e3, c * 1e3, 100 * (c - p) / p, i * 1e6, 100 * i / p, setup * 1e3))
        big = 32000 + len(cfg.tokens())
        ids = {t: 32000 + k for k, t in enumerate(cfg.tokens())}
        for batch in map(int, args.batches.split(",")):
            alone = time_processor(GETokLogitsProcessor(ids, cfg, 2, big, never_ids=[1]), batch, big)
            rows.append((batch, big, None, None, None, alone * 1e6, None, None))
    f = lambda v, fmt: "–" if v is None else format(v, fmt)  # noqa: E731
    lines = [
        "| batch | vocab | unconstrained ms/token | constrained ms/token | end-to-end difference | processor µs/token | processor / unconstrained step | processor setup + first call, ms |",
        "|---|---|---|---|---|---|---|---|",
    ] + [f"| {b} | {v} | {f(p, '.3f')} | {f(c, '.3f')} | {f(o, '+.1f')}{'' if o is None else ' %'} | {f(a, '.0f')} | "
         f"{f(s, '.1f')}{'' if s is None else ' %'} | {f(t, '.1f')} |"
         for b, v, p, c, o, a, s, t in rows]
    head = (f"Tiny random LLaVA (LLaMA hidden 64 x 2 layers, CLIP 32 px), {args.tokens} new tokens per call, greedy, "
            f"best of {args.repeats} interleaved runs. Processor µs/token: time spent inside the (reused, as the "
            f"predictor does) processor during those generate calls, per token, median; setup + first call: building "
            f"the processor and all it does in its first generate call (its tables, every budget level). torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (load average "
            f"{os.getloadavg()[0]:.1f}: shared with other jobs, so end-to-end differences are mostly noise; the "
            f"processor's own time is measured directly). LLaMA-sized vocabulary: the processor alone on random "
            f"scores (median of 300 calls).")
    md = "# Constrained decoding: cost per token\n\n" + head + "\n\n" + "\n".join(lines) + "\n"
    print(md)
    write_text_atomic(args.output, md)


if __name__ == "__main__":
    main()
