"""Messages that a GETok run on a CPU prints and that tell its user nothing, and filters for exactly those.

Each entry names the logger (or warning) and the start of the message; nothing else is silenced, and every other
warning of these libraries still shows. :func:`install` filters them in this process; :class:`LineFilter` drops
them from the text output of another process (``llava-getok demo`` reads its training run that way).
"""
from __future__ import annotations

import ast
import logging
import re
import warnings

# (logger, message start, why the user need not hear it)
LOG_NOISE = (
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community",
     "an optional hub kernel for 4-bit matmuls on AVX512-BF16 CPUs; bitsandbytes uses its own instead"),
    ("DeepSpeed", "Setting accelerator to CPU", "DeepSpeed found no GPU, on a run that asked for none"),
    *((logger, "Using a slow image processor as `use_fast` is unset",
       "a GETok checkpoint's processor is the one it was trained with; the fast one it suggests makes other pixels")
      for logger in ("transformers.processing_utils", "transformers.models.auto.image_processing_auto")),
)
# transformers' "Some weights of ... were not used / newly initialized: [keys]", when every key is one of the CLIP
# tower's: a LLaVA checkpoint holds the tower, and LLaVA loads it into the tower itself after from_pretrained
WEIGHTS_LOGGER, WEIGHTS_NOISE, TOWER_KEY = "transformers.modeling_utils", "Some weights of ", "model.vision_tower."
# (warning category, message start, why)
WARNING_NOISE = ((FutureWarning, "`tokenizer` is deprecated and will be removed in version 5.0.0",
                  "transformers renamed the Trainer's tokenizer= argument, which LLaVA's code passes"),)
PRINT_NOISE = ("Formatting inputs...Skip in lazy mode",)  # LLaVA's own print when its dataset is lazy


def is_noise(message: str) -> bool:
    """Whether a log message or an output line is one of the messages above."""
    if message.startswith("["):  # DeepSpeed's format: "[time] [LEVEL] [file:line:function] message"
        message = message.split("] ", 3)[-1]
    if message.startswith(WEIGHTS_NOISE):
        return _tower_keys_only(message)
    starts = [start for _, start, _ in LOG_NOISE] + [start for _, start, _ in WARNING_NOISE]
    return message.startswith(tuple(starts)) or message.strip() in PRINT_NOISE


def _tower_keys_only(message: str) -> bool:
    listed = message[message.find(": [") + 2:].split("\n", 1)[0]
    try:
        keys = ast.literal_eval(listed)
    except (ValueError, SyntaxError):
        return False
    return isinstance(keys, list) and bool(keys) and all(str(k).startswith(TOWER_KEY) for k in keys)


class _Drop(logging.Filter):
    def filter(self, record):
        return not is_noise(record.getMessage())


def install() -> None:
    """Filter the messages above in this process (idempotent; call before the libraries are imported or after)."""
    for name in [name for name, _, _ in LOG_NOISE] + [WEIGHTS_LOGGER]:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Drop) for f in logger.filters):
            logger.addFilter(_Drop())
    for category, start, _ in WARNING_NOISE:
        warnings.filterwarnings("ignore", message=re.escape(start), category=category)


def python_warnings_option() -> str:
    """The warnings above as a ``PYTHONWARNINGS`` value, for a child Python process."""
    return ",".join(f"ignore:{start}:{category.__name__}" for category, start, _ in WARNING_NOISE)


class LineFilter:
    """Drops the messages above from the lines of another process's output, with the lines that transformers
    appends to a dropped "Some weights ..." message ("- This IS ...", "You should probably TRAIN ...")."""

    def __init__(self):
        self._in_dropped = False

    def keep(self, line: str) -> bool:
        if self._in_dropped and line.startswith(("- This IS", "You should probably TRAIN")):
            return False
        self._in_dropped = is_noise(line)
        return not self._in_dropped
