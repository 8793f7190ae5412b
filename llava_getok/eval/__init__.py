"""Evaluation: REC / RES / pointing metrics (:mod:`.metrics`) and ``llava-getok eval`` (:mod:`.cli`)."""
from .metrics import SampleScore, aggregate, score_record

__all__ = ["SampleScore", "aggregate", "score_record"]
