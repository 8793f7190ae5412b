"""``vg``: Visual Genome region descriptions (``region_descriptions.json``).

``[{"id": image_id, "regions": [{"region_id", "image_id", "phrase", "x", "y", "width", "height"}]}]``.
If ``image_data.json`` lies next to the input, image sizes and paths (``VG_100K/ID.jpg`` or
``VG_100K_2/ID.jpg``, from its urls) come from it; else paths are ``ID.jpg`` and sizes come from the image
headers under --image-root. One record per region. Tasks: reg (region -> description, as LLaVA-1.5 uses
VG), rec, point. ``image_data.json`` is a lookup table: an entry without a distinct ``image_id`` (or ``id``)
stops the run.
"""
from __future__ import annotations

from pathlib import Path

from .base import Sample
from .inputs import ConvertError, Fields, as_key, json_type, load_json

TASKS = ("reg", "rec", "point")
FORMATS = "Visual Genome region_descriptions.json (+ image_data.json beside it for sizes and paths)"


def inputs(opts):
    """What the conversion reads: the regions file and, when present, image_data.json beside it."""
    side = Path(opts.input).parent / "image_data.json"
    return [Path(opts.input)] + ([side] if side.is_file() else [])


def _image_data(path: Path) -> dict:
    """image_data.json -> {image_id: (relative path, (width, height) or None)}."""
    data = load_json(path)
    if not isinstance(data, list):
        raise ConvertError(str(path), None, f"expected a list of images, got {json_type(data)}", "not a list")
    meta = {}
    for k, entry in enumerate(data):
        im = Fields(entry, str(path), f"[{k}]")
        iid = im.ident("image_id", optional=True)
        iid = im.ident("id") if iid is None else iid
        if iid in meta:
            raise im.error("image_id", f"image_id {iid!r} repeats an earlier entry", "duplicate image_id")
        url = im.string("url", optional=True)
        meta[iid] = ("/".join(url.split("/")[-2:]) if url else f"{iid}.jpg", im.optional_size())
    return meta


def read(opts):
    path = Path(opts.input)
    data = load_json(path)
    if not isinstance(data, list):
        raise ConvertError(str(path), None, f"expected a list of images with regions, got {json_type(data)}", "not a list")
    side = path.parent / "image_data.json"
    meta = _image_data(side) if side.is_file() else {}
    for k, entry in enumerate(data):
        regions = entry.get("regions") if isinstance(entry, dict) else None
        if not isinstance(regions, list):
            yield f"{path.name}:{k}", ConvertError(f"{path.name}:{k}", "regions", "missing or not a list", "missing regions")
            continue
        for r, region in enumerate(regions):
            iid = region.get("image_id", entry.get("id")) if isinstance(region, dict) else entry.get("id")
            rid = region.get("region_id") if isinstance(region, dict) else None
            yield f"{path.name}:{k} regions[{r}] (region_id {rid})", {"region": region, "r": r, "image_id": iid, "meta": meta.get(as_key(iid))}


def parse(raw, where, opts) -> Sample:
    region = Fields(raw["region"], where, f"regions[{raw['r']}]")
    x, y, w, h = (region.number(k) for k in ("x", "y", "width", "height"))
    if w < 0 or h < 0:
        raise region.error("width", f"negative width or height: {w}, {h}", "box x2 < x1 or y2 < y1")
    iid = raw["image_id"]
    if as_key(iid) is None:
        raise region.error("image_id", f"expected a string or an integer, got {iid!r}", "bad image_id")
    rel, size = raw["meta"] or (f"{iid}.jpg", None)
    return Sample(
        id=f"vg-{iid}-{region.ident('region_id')}", image=rel, size=size,
        expression=region.string("phrase"), boxes=((x, y, x + w, y + h),), where=where,
        fields={"boxes": region.name("x, y, width, height"), "size": "image_data.json width, height",
                "image": "image_data.json url", "expression": region.name("phrase")},
    )
