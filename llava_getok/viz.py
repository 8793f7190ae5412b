"""Pictures: predicted (red) and ground-truth (green) boxes, masks, points and polylines on the image,
optionally the GETok lattice of the model's frame and the cells that hold each shape's anchors; a contact
sheet for many samples. PIL only (masks of RES answers come from :mod:`llava_getok.masks` when asked).

    llava-getok show --annotations A.json --image-root DIR --output out.png [--predictions P.jsonl]
                     [--grid] [--ids ID,...] [--limit 16] [--columns 4] [--thumb 320] [--output-dir DIR]

One sample -> a PNG of the image's own size; several -> a contact sheet (``--output-dir`` also writes each
sample's full-size picture). Shapes are in pixels of the original image (docs/data-format.md).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .atomic import atomic_path
from .geometry import points_from_frame, points_to_frame
from .records import RecordsError, parse_answer, read_predictions, read_records, record_mask, shapes_from_pixels
from .vocab import GETokConfig

GT, PRED, LATTICE = (40, 200, 60), (235, 40, 40), (255, 255, 255)
MIN_CAPTION_WIDTH = 160  # pixels; smaller pictures get their caption on the contact sheet only
CAPTION_STRIP = 14


def _width(image: Image.Image) -> int:
    return max(2, round(max(image.size) / 250))


def draw_shapes(draw: ImageDraw.ImageDraw, shapes, color, width: int):
    """Boxes as rectangles, polylines as lines, points and mask anchors as dots (pixels)."""
    r = 2 * width
    for s in shapes:
        pts = [tuple(map(float, p)) for p in s.get("points", [])]
        if not pts:
            continue
        if s.get("kind") == "box":
            (x1, y1), (x2, y2) = np.min(pts, 0), np.max(pts, 0)
            draw.rectangle([x1, y1, x2, y2], outline=color, width=width)
        elif s.get("kind") == "polyline":
            draw.line(pts, fill=color, width=width, joint="curve")
        for x, y in pts if s.get("kind") != "box" else []:
            rr = r if s.get("kind") == "point" else max(2, r // 2)
            draw.ellipse([x - rr, y - rr, x + rr, y + rr], fill=color, outline=(0, 0, 0))


def overlay_mask(image: Image.Image, mask, color, alpha: float = 0.4) -> Image.Image:
    """Blend ``color`` into the pixels where ``mask`` (H, W bool) is set."""
    m = np.asarray(mask, dtype=bool)
    if m.shape != (image.height, image.width):
        raise ValueError(f"mask is {m.shape[1]}x{m.shape[0]}, image is {image.width}x{image.height}")
    a = np.asarray(image.convert("RGB"), dtype=np.float32)
    a[m] = (1 - alpha) * a[m] + alpha * np.asarray(color, dtype=np.float32)
    return Image.fromarray(a.round().astype(np.uint8))


def lattice_lines(cfg: GETokConfig, size, frame: str):
    """The n + 1 vertical and n + 1 horizontal lattice lines of the frame, in pixels, clipped to the image."""
    w, h = size
    k = np.arange(cfg.grid + 1) / cfg.grid
    xs = points_from_frame(np.stack([k, np.zeros_like(k)], 1), size, frame, clamp=False)[:, 0]
    ys = points_from_frame(np.stack([np.zeros_like(k), k], 1), size, frame, clamp=False)[:, 1]
    vertical = [((x, 0), (x, h)) for x in xs if 0 <= x <= w]
    horizontal = [((0, y), (w, y)) for y in ys if 0 <= y <= h]
    return vertical + horizontal


def anchor_cells(shapes, cfg: GETokConfig, size, frame: str):
    """Pixel rectangles of the lattice cells that hold the shapes' points (their grid tokens)."""
    pts = [p for s in shapes for p in s.get("points", [])]
    if not pts:
        return []
    cells = np.unique(cfg.cells(points_to_frame(np.asarray(pts, dtype=np.float64), size, frame)), axis=0)
    lo = points_from_frame(cells / cfg.grid, size, frame)
    hi = points_from_frame((cells + 1) / cfg.grid, size, frame)
    return [(*a, *b) for a, b in zip(lo.tolist(), hi.tolist())]


def render(image: Image.Image, gt_shapes=(), pred_shapes=(), gt_mask=None, pred_mask=None,
           cfg: GETokConfig | None = None, frame: str = "pad", grid: bool = False, caption: str | None = None) -> Image.Image:
    """One picture of the image's size: masks blended, then lattice and anchor cells (``grid``), then shapes."""
    out = image.convert("RGB")
    if gt_mask is not None:
        out = overlay_mask(out, gt_mask, GT, 0.35)
    if pred_mask is not None:
        out = overlay_mask(out, pred_mask, PRED, 0.35)
    width = _width(out)
    if grid and cfg is not None:
        layer = Image.new("RGBA", out.size, (0, 0, 0, 0))
        d = ImageDraw.Draw(layer)
        for line in lattice_lines(cfg, out.size, frame):
            d.line(line, fill=(*LATTICE, 70), width=1)
        for shapes, color in ((gt_shapes, GT), (pred_shapes, PRED)):
            for rect in anchor_cells(shapes, cfg, out.size, frame):
                d.rectangle(rect, outline=(*color, 255), fill=(*color, 50), width=1)
        out = Image.alpha_composite(out.convert("RGBA"), layer).convert("RGB")
    d = ImageDraw.Draw(out)
    draw_shapes(d, gt_shapes, GT, width)
    draw_shapes(d, pred_shapes, PRED, width)
    if caption and out.width >= MIN_CAPTION_WIDTH:  # on tiny images a caption would hide the picture
        font = ImageFont.load_default()
        box = d.textbbox((4, 4), caption, font=font)
        d.rectangle([box[0] - 2, box[1] - 2, box[2] + 2, box[3] + 2], fill=(0, 0, 0))
        d.text((4, 4), caption, fill=(255, 255, 255), font=font)
    return out


def contact_sheet(pictures: list[Image.Image], columns: int = 4, thumb: int = 320, pad: int = 4,
                  captions: list[str] | None = None) -> Image.Image:
    """Pictures scaled to fit ``thumb`` x ``thumb`` (aspect kept; small ones scaled up, pixels kept sharp),
    laid out in rows of ``columns``; ``captions`` go in a strip under each cell."""
    if not pictures:
        raise ValueError("contact_sheet needs at least one picture")
    columns = max(1, min(columns, len(pictures)))
    rows = -(-len(pictures) // columns)
    strip = CAPTION_STRIP if captions else 0
    cell_h = thumb + strip
    sheet = Image.new("RGB", (columns * (thumb + pad) + pad, rows * (cell_h + pad) + pad), (24, 24, 24))
    d = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for k, p in enumerate(pictures):
        scale = min(thumb / p.width, thumb / p.height)
        t = p.resize((max(1, round(p.width * scale)), max(1, round(p.height * scale))),
                     Image.NEAREST if scale > 1 else Image.LANCZOS)
        r, c = divmod(k, columns)
        x0, y0 = pad + c * (thumb + pad), pad + r * (cell_h + pad)
        sheet.paste(t, (x0 + (thumb - t.width) // 2, y0 + (thumb - t.height) // 2))
        if captions:
            text = captions[k]
            while text and d.textlength(text, font=font) > thumb:  # cut to the cell's width
                text = text[:-2] + "…" if len(text) > 1 else ""
            d.text((x0, y0 + thumb + 1), text, fill=(230, 230, 230), font=font)
    return sheet


def save_png(picture: Image.Image, path: Path):
    """Write atomically (temp file + rename)."""
    with atomic_path(path) as tmp:
        picture.save(tmp, format="PNG")


def sample_picture(record: dict, prediction: dict | None, image_root, grid: bool = False, masks: bool = True,
                   generator=None) -> Image.Image:
    """The picture of one converted record and its prediction (None: ground truth only)."""
    g = record.get("getok") or {}
    path = Path(image_root) / str(record.get("image"))
    if not record.get("image") or not path.is_file():
        raise FileNotFoundError(f"record {record.get('id')}: field 'image': {path} not found")
    from .images import ImageError, load_image

    try:
        image = load_image(path)  # upright: the shapes are in the pixels the model saw
    except ImageError as e:
        raise ValueError(f"record {record.get('id')}: field 'image': {e}") from None
    cfg = GETokConfig.from_dict(g["config"]) if g.get("config") else None
    frame = g.get("frame", "pad")
    if prediction is not None and "shapes" not in prediction and g:  # a model's raw answer: parsed as eval parses it
        prediction = parse_answer(record, prediction.get("text", ""))
    pred_shapes = (prediction or {}).get("shapes") or []
    pred_mask = None
    mask_shapes = [s for s in pred_shapes if s.get("kind") == "mask"]
    if masks and mask_shapes:
        from .masks import mask_from_anchors

        anchors = [p for s in shapes_from_pixels(mask_shapes, image.size, frame) for p in s.points]
        pred_mask = mask_from_anchors(anchors, np.asarray(image), frame, generator)
    return render(image, g.get("shapes") or [], pred_shapes, record_mask(g) if masks else None, pred_mask,
                  cfg, frame, grid, sample_caption(record, prediction))


def sample_caption(record: dict, prediction: dict | None) -> str:
    g = record.get("getok") or {}
    caption = str(record.get("id"))
    if g.get("expression"):
        caption += f": {g['expression']}"
    if prediction and prediction.get("errors"):
        caption += " [unparseable]"
    return caption


def _parser():
    p = argparse.ArgumentParser(prog="llava-getok show", description=__doc__.split("\n")[0])
    p.add_argument("--annotations", type=Path, required=True, help="converted file (JSON list or JSONL)")
    p.add_argument("--predictions", type=Path, help="predictions JSONL (default: ground truth only)")
    p.add_argument("--image-root", type=Path, required=True)
    p.add_argument("--output", type=Path, required=True, help="PNG: the picture (one sample) or a contact sheet")
    p.add_argument("--output-dir", type=Path, help="also write each sample's full-size picture here")
    p.add_argument("--grid", action="store_true", help="draw the lattice of the model's frame and the anchor cells")
    p.add_argument("--no-masks", action="store_true", help="skip mask overlays (no proposals computed)")
    p.add_argument("--ids", help="comma-separated record ids to draw (default: the first --limit)")
    p.add_argument("--limit", type=int, default=16)
    p.add_argument("--columns", type=int, default=4)
    p.add_argument("--thumb", type=int, default=320, help="contact sheet cell size in pixels")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        records = read_records(args.annotations)
        preds = read_predictions(args.predictions) if args.predictions else {}
    except (RecordsError, OSError) as e:
        print(f"llava-getok show: {e}", file=sys.stderr)
        return 1
    if args.ids:
        wanted = args.ids.split(",")
        by_id = {str(r["id"]): r for r in records}
        missing = [i for i in wanted if i not in by_id]
        if missing:
            print(f"llava-getok show: {args.annotations}: no record with id {missing[0]!r}", file=sys.stderr)
            return 1
        records = [by_id[i] for i in wanted]
    else:
        records = records[: args.limit]
    if not records:
        print(f"llava-getok show: {args.annotations}: no records to draw", file=sys.stderr)
        return 1
    pictures = []
    try:
        for r in records:
            pic = sample_picture(r, preds.get(str(r["id"])), args.image_root, args.grid, not args.no_masks)
            if args.output_dir:
                save_png(pic, args.output_dir / f"{str(r['id']).replace('/', '_')}.png")
            pictures.append(pic)
    except (FileNotFoundError, ValueError) as e:
        print(f"llava-getok show: {e}", file=sys.stderr)
        return 1
    captions = [sample_caption(r, preds.get(str(r["id"]))) for r in records]
    sheet = pictures[0] if len(pictures) == 1 else contact_sheet(pictures, args.columns, args.thumb, captions=captions)
    save_png(sheet, args.output)
    print(f"wrote {args.output} ({len(pictures)} sample(s))", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
