"""Grounding datasets -> GETok conversations in LLaVA's format (``convert-datasets``).

Layout (one idea per file):
- ``inputs.py``: the one layer of input handling every source reads through (bytes -> records -> fields):
  files, encodings and JSON, records that are not objects, typed field access whose errors name the source's
  own field; :class:`ConvertError` (file, record, field) and :class:`Filtered` (counted skips).
- ``base.py``: the source interface (``read`` / ``parse`` / ``TASKS``) and the validated :class:`Sample`
  (original pixels).
- ``registry.py``: source name -> module, imported lazily; ``--list`` shows missing ones as "not installed".
- ``conversations.py``: the one function from a Sample to a LLaVA record (``build_record``); token strings
  come from ``llava_getok.codec`` only, what a record holds (prompts, pixel shapes, mask RLE) from
  ``llava_getok.records``. The way back is ``llava_getok.records.decode_record``.
- ``pipeline.py``: streaming, worker processes, counts, rejects file, repeated ids, atomic output, resume.
- ``cli.py``: ``convert-datasets``; one module per source format beside these.

Example::

    convert-datasets coco --input instances_val2017.json --image-root val2017 --task res --output res.jsonl
    convert-datasets llava --input llava_v1_5_mix665k.json --image-root data --output mix_getok.json --workers 2
    convert-datasets decode res.jsonl | head
"""
