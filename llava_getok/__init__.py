"""llava-getok: GETok spatial tokens (arXiv 2512.10554) for LLaVA. Public names: spec section 9.

The core (vocab, geometry, codec, parse) imports numpy only; ``register()`` imports LLaVA on first use.
"""
from .codec import (
    Refinement,
    Shape,
    apply_refinement,
    dequantize,
    decode_boxes,
    encode_box,
    encode_boxes,
    encode_mask_points,
    encode_point,
    encode_polyline,
    encode_refinement,
    encode_shape,
    quantize,
    refinement_offsets,
    render,
)
from .parse import ParseError, ParseResult, parse, parse_ids
from .vocab import GETokConfig

__version__ = "0.1.0"


def decode_point(text: str, cfg: GETokConfig) -> tuple[float, float]:
    """Tokens of one point -> normalised (x, y); ValueError if ``text`` is not exactly one point."""
    return _only(text, cfg, "point").points[0]


def decode_box(text: str, cfg: GETokConfig) -> tuple[float, float, float, float]:
    """Tokens of one box -> normalised (x1, y1, x2, y2); ValueError if ``text`` is not exactly one box."""
    return _only(text, cfg, "box").box


def _only(text, cfg, kind):
    r = parse(text, cfg)
    if r.errors or len(r.shapes) != 1 or r.shapes[0].kind != kind:
        why = "; ".join(e.message for e in r.errors) or f"found {[s.kind for s in r.shapes]}"
        raise ValueError(f"expected exactly one {kind} in {text!r}: {why}")
    return r.shapes[0]


def register(**kwargs):
    """Apply every LLaVA hook (tokenizer, templates, builder, trainer loss, compat fixes); idempotent."""
    from .llava import register as _register

    return _register(**kwargs)
