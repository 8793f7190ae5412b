"""``getok_config.json`` and ``getok_rows.safetensors``: what every GETok checkpoint records about itself.

The sidecar says how the checkpoint was built (location format, GETok config, token list and ids, vocabulary size,
tokenizer ``legacy`` flag, frame / ``image_aspect_ratio``, base model, kind of checkpoint), so the builder hook can
load it back exactly, whatever the folder is called, and ``predict`` and ``eval`` know the format without a flag. The rows file holds the effective GETok rows of the input
embeddings and the LM head (k x dim each), small enough to write at every save step.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..atomic import atomic_path, write_text_atomic
from ..formats import LocationFormat, format_from_dict, format_name
from ..vocab import GETokConfig

SIDECAR = "getok_config.json"
ROWS_FILE = "getok_rows.safetensors"
TOWER_FILE = "getok_vision_tower.safetensors"
FORMAT_VERSION = 1
KINDS = ("full", "lora", "projector")
BACKENDS = ("llava", "hf")


@dataclass
class Sidecar:
    """Contents of ``getok_config.json``. ``tokenizer_legacy``: the flag the checkpoint's tokenizer was trained
    with; False for every GETok training (a legacy tokenizer is switched, ``tokens.use_non_legacy``), and the
    builder loads the tokenizer with ``legacy=False`` whatever its folder says. ``format``: the location format the
    model answers in (``formats.format_to_dict``: ``{"name": "bins", "bins": 1000}``, ...); a sidecar without it
    (written before formats existed) is GETok with ``getok`` as its config. ``getok``: the GETok config (``{}`` for
    the text and bins formats); ``tokens`` / ``token_ids``: the format's added tokens (none for text).
    ``image_aspect_ratio``: LLaVA's setting (None for the hf backend, whose ``processor`` settings say the same)."""

    getok: dict
    tokens: list[str]
    token_ids: list[int]
    vocab_size: int
    tokenizer_legacy: bool | None
    image_aspect_ratio: str | None
    frame: str
    kind: str
    base_model: str | None = None
    init: str = "sincos2d"
    loss: dict = field(default_factory=dict)
    vision_tower_trained: bool = False
    format: dict | None = None
    format_version: int = FORMAT_VERSION
    # --- the backend that wrote the checkpoint: "llava" (LLaVA 1.2.x) or "hf" (llava_getok.hf, transformers-native
    # models), its model family there ("qwen2.5-vl", "llava-hf") and the image processor's settings that decide the
    # frame and the image tokens; a sidecar without them is LLaVA's ---
    backend: str = "llava"
    model_family: str | None = None
    processor: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"{SIDECAR}: backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.kind not in KINDS:
            raise ValueError(f"{SIDECAR}: kind must be one of {KINDS}, got {self.kind!r}")
        if len(self.tokens) != len(self.token_ids):
            raise ValueError(f"{SIDECAR}: {len(self.tokens)} tokens but {len(self.token_ids)} token_ids")
        if self.format is not None:
            format_from_dict(self.format)  # ValueError for a format that does not parse: not a valid sidecar

    @property
    def location_format(self) -> LocationFormat:
        """The format the checkpoint answers in (GETok's config when the sidecar predates formats)."""
        return format_from_dict(self.format) if self.format is not None else GETokConfig.from_dict(self.getok)

    @property
    def config(self) -> GETokConfig:
        """The GETok config; ValueError for a checkpoint trained on another location format."""
        fmt = self.location_format
        if not isinstance(fmt, GETokConfig):
            raise ValueError(f"{SIDECAR}: this checkpoint answers in the {format_name(fmt)} location format, not GETok")
        return fmt

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
        if data.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"format_version {data.get('format_version')!r}, this version reads {FORMAT_VERSION}")
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
