"""Grounding datasets -> GETok conversations in LLaVA's format (``convert-datasets``).

Layout (one idea per file):
- ``base.py``: the source interface (``read`` / ``parse`` / ``TASKS``), the validated :class:`Sample`
  (original pixels), :class:`ConvertError` (file, record, field) and :class:`Filtered` (counted skips).
- ``registry.py``: source name -> module, imported lazily; ``--list`` shows missing ones as "not installed".
- ``conversations.py``: the one function from a Sample to a LLaVA record (``build_record``); token strings
  come from ``llava_getok.codec`` only, what a record holds (prompts, pixel shapes, mask RLE) from
  ``llava_getok.records``. The way back is ``llava_getok.records.decode_record``.
- ``pipeline.py``: streaming, worker processes, counts, rejects file, atomic output, resume.
- ``cli.py``: ``convert-datasets``; one module per source format beside these.

Example::

    convert-datasets coco --input instances_val2017.json --image-root val2017 --task res --output res.jsonl
    convert-datasets llava --input llava_v1_5_mix665k.json --image-root data --output mix_getok.json --workers 2
    convert-datasets decode res.jsonl | head
"""
