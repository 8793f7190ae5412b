"""``vg``: Visual Genome region descriptions (``region_descriptions.json``).

``[{"id": image_id, "regions": [{"region_id", "image_id", "phrase", "x", "y", "width", "height"}]}]``.
If ``image_data.json`` lies next to the input, image sizes and paths (``VG_100K/ID.jpg`` or
``VG_100K_2/ID.jpg``, from its urls) come from it; else paths are ``ID.jpg`` and sizes come from the image
headers under --image-root. One record per region. Tasks: reg (region -> description, as LLaVA-1.5 uses
VG), rec, point.
"""
from __future__ import annotations

from pathlib import Path

from .base import ConvertError, Sample, check_numbers, get, load_json

TASKS = ("reg", "rec", "point")
FORMATS = "Visual Genome region_descriptions.json (+ image_data.json beside it for sizes and paths)"


def read(opts):
    path = Path(opts.input)
    data = load_json(path)
    if not isinstance(data, list):
        raise ConvertError(str(path), "-", "expected a list of images with regions", "not a list")
    meta = {}
    if (path.parent / "image_data.json").is_file():
        for im in load_json(path.parent / "image_data.json"):
            iid = im.get("image_id", im.get("id"))
            url = im.get("url") or ""
            rel = "/".join(url.split("/")[-2:]) if url else f"{iid}.jpg"
            meta[iid] = (rel, (im.get("width"), im.get("height")))
    for k, entry in enumerate(data):
        regions = entry.get("regions") if isinstance(entry, dict) else None
        if not isinstance(regions, list):
            yield f"{path.name}:{k}", ConvertError(f"{path.name}:{k}", "regions", "missing or not a list", "missing regions")
            continue
        for r, region in enumerate(regions):
            iid = region.get("image_id", entry.get("id")) if isinstance(region, dict) else entry.get("id")
            yield f"{path.name}:{k} regions[{r}] (region_id {region.get('region_id') if isinstance(region, dict) else None})", {"region": region, "image_id": iid, "meta": meta.get(iid)}


def parse(raw, where, opts) -> Sample:
    if isinstance(raw, ConvertError):
        raise raw
    region = raw["region"]
    x, y, w, h = check_numbers([get(region, k, where) for k in ("x", "y", "width", "height")], 4, where, "x, y, width, height")
    if w < 0 or h < 0:
        raise ConvertError(where, "width", f"negative width or height: {w}, {h}", "box x2 < x1 or y2 < y1")
    rel, size = raw["meta"] or (f"{raw['image_id']}.jpg", (None, None))
    return Sample(
        id=f"vg-{raw['image_id']}-{get(region, 'region_id', where)}", image=rel, size=size if None not in size else None,
        expression=get(region, "phrase", where, str), boxes=((x, y, x + w, y + h),), where=where, fields={"boxes": "x, y, width, height"},
    )
