"""Serving for LLaVA's own fleet: ``python -m llava_getok.serve.model_worker`` is a model worker that LLaVA's
controller (``python -m llava.serve.controller``) and its clients speak to (the ``serve`` extra)."""
