"""``getok_config.json`` and ``getok_rows.safetensors``: what every GETok checkpoint records about itself.

The sidecar says how the checkpoint was built, so that it loads back exactly whatever its folder is called, and
``predict``, ``chat`` and ``eval`` need no flag to use it: the backend and kind of checkpoint, the location format
and its tokens' ids, the vocabulary size, the tokenizer's ``legacy`` flag, the conversation template, how images
became pixels (the image processor's settings) and so which frame coordinates are in, the base model, and every
option of the training run. The rows file holds the effective GETok rows of the input embeddings and the LM head
(k x dim each), small enough to write at every save step.

Schema version 2; a version-1 sidecar (written before the schema recorded the run's settings and template) is read
into version 2 (:func:`read_sidecar`): nothing it recorded is lost.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..atomic import atomic_path, write_text_atomic
from ..formats import LocationFormat, format_from_dict, format_name, format_to_dict
from ..vocab import GETokConfig

SIDECAR = "getok_config.json"
ROWS_FILE = "getok_rows.safetensors"
TOWER_FILE = "getok_vision_tower.safetensors"
FORMAT_VERSION = 2
KINDS = ("full", "lora", "projector")
BACKENDS = ("llava", "hf")  # llava_getok.llava (LLaVA 1.2.x), llava_getok.hf (transformers-native models)


@dataclass
class Sidecar:
    """Contents of ``getok_config.json`` (schema :data:`FORMAT_VERSION`).

    format: the location format the model answers in (``formats.format_to_dict``: ``{"name": "getok", "grid": 32,
        ...}``, ``{"name": "bins", "bins": 1000}``); tokens / token_ids: its added tokens and their ids (none for
        text); vocab_size: rows of the embedding matrices; tokenizer_legacy: the flag the checkpoint's tokenizer was
        trained with (False for every GETok training: a legacy tokenizer is switched, ``tokens.use_non_legacy``);
    kind: "full", "lora" or "projector"; frame: the frame coordinates are in (spec section 1); backend: the code that
        loads it ("llava": llava_getok.llava; "hf": llava_getok.hf, whose ``model_family`` is "qwen2.5-vl" or
        "llava-hf"); base_model: what a LoRA or projector checkpoint applies to;
    template: the conversation template of training (LLaVA's ``--version``), None when not recorded;
    processor: how images became pixels (LLaVA: ``{"image_aspect_ratio": "pad"}``);
    settings: every option of the run (``asdict(GETokSettings)``); vision_tower_trained: the tower's weights are in
        the checkpoint."""

    format: dict
    tokens: list[str]
    token_ids: list[int]
    vocab_size: int
    tokenizer_legacy: bool | None
    kind: str
    frame: str
    backend: str = "llava"
    base_model: str | None = None
    template: str | None = None
    processor: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    vision_tower_trained: bool = False
    format_version: int = FORMAT_VERSION
    model_family: str | None = None  # backend "hf" (llava_getok.hf): "qwen2.5-vl" or "llava-hf"

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"{SIDECAR}: backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.kind not in KINDS:
            raise ValueError(f"{SIDECAR}: kind must be one of {KINDS}, got {self.kind!r}")
        if len(self.tokens) != len(self.token_ids):
            raise ValueError(f"{SIDECAR}: {len(self.tokens)} tokens but {len(self.token_ids)} token_ids")
        format_from_dict(self.format)  # ValueError for a format that does not parse: not a valid sidecar

    @classmethod
    def of(cls, fmt: LocationFormat, ids: list[int], **fields) -> "Sidecar":
        """A sidecar for location format ``fmt`` whose tokens got ``ids``."""
        return cls(format=format_to_dict(fmt), tokens=list(fmt.tokens()), token_ids=list(ids), **fields)

    @property
    def location_format(self) -> LocationFormat:
        """The format the checkpoint answers in."""
        return format_from_dict(self.format)

    @property
    def config(self) -> GETokConfig:
        """The GETok config; ValueError for a checkpoint trained on another location format."""
        fmt = self.location_format
        if not isinstance(fmt, GETokConfig):
            raise ValueError(f"{SIDECAR}: this checkpoint answers in the {format_name(fmt)} location format, not GETok")
        return fmt

    @property
    def image_aspect_ratio(self) -> str | None:
        """LLaVA's ``image_aspect_ratio`` of training (None for other backends)."""
        return self.processor.get("image_aspect_ratio")

    def check_tokenizer(self, tokenizer, where: str) -> None:
        """Refuse a tokenizer whose ids for the GETok tokens differ from the recorded ones."""
        ids = tokenizer.convert_tokens_to_ids(self.tokens)
        bad = [(t, want, got) for t, want, got in zip(self.tokens, self.token_ids, ids) if want != got]
        if bad:
            t, want, got = bad[0]
            raise ValueError(f"{where}: tokenizer gives {t!r} id {got}, {SIDECAR} records {want} "
                             f"({len(bad)} of {len(self.tokens)} location tokens disagree); refusing to load")
        if len(tokenizer) > self.vocab_size:
            raise ValueError(f"{where}: tokenizer has {len(tokenizer)} tokens, more than the recorded "
                             f"vocabulary size {self.vocab_size}")


def upgrade(data: dict) -> dict:
    """A version-1 sidecar's fields as version 2: its GETok config (``getok``) or ``format`` as ``format``, its
    ``image_aspect_ratio`` as the processor's, its ``init`` and ``loss`` settings as ``settings``."""
    data = dict(data)
    fmt = data.pop("format", None)
    getok = data.pop("getok", {})
    data["format"] = fmt if fmt is not None else {"name": "getok", **getok}
    data["processor"] = {"image_aspect_ratio": data.pop("image_aspect_ratio", None)}
    data["settings"] = {"init": data.pop("init", None), **data.pop("loss", {})}
    data["format_version"] = FORMAT_VERSION
    return data


def write_json_atomic(path: Path, data) -> None:
    write_text_atomic(path, json.dumps(data, indent=1))


def save_tensors_atomic(path: Path, tensors: dict) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))


def write_sidecar(folder, sidecar: Sidecar) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / SIDECAR, asdict(sidecar))
    return folder / SIDECAR


def read_sidecar(folder) -> Sidecar | None:
    """The sidecar of ``folder``, or None when it has none (a plain LLaVA checkpoint)."""
    path = Path(folder) / SIDECAR
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        if data.get("format_version") == 1:
            data = upgrade(data)
        if data.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"format_version {data.get('format_version')!r}, this version reads 1 and {FORMAT_VERSION}")
        return Sidecar(**data)
    except (TypeError, ValueError, json.JSONDecodeError) as e:  # a sidecar of an unknown format included
        raise ValueError(f"{path}: not a valid GETok sidecar: {e}") from None


def read_rows(folder, sidecar: Sidecar) -> dict:
    """The rows file of ``folder``, checked against the sidecar's ids."""
    from safetensors.torch import load_file

    path = Path(folder) / ROWS_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing; every GETok checkpoint stores its GETok rows there")
    rows = load_file(str(path))
    ids = rows["token_ids"].tolist()
    if ids != list(sidecar.token_ids):
        raise ValueError(f"{path}: token_ids disagree with {SIDECAR} (first: {ids[:3]} vs {sidecar.token_ids[:3]})")
    return rows
