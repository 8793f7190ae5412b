"""GETok for transformers-native vision-language models (``Qwen2_5_VLForConditionalGeneration``,
``LlavaForConditionalGeneration``), trained with trl's ``SFTTrainer``: the second backend beside ``llava_getok.llava``.

It reuses the token language (``llava_getok.vocab`` / ``codec`` / ``parse`` / ``formats``), the converted records
(``llava_getok.records``), the training core (``llava_getok.training``: tokens, row initialisation, the box-token
loss, settings, sidecar) and constrained decoding (``llava_getok.generation``), and never imports ``llava``. One
module a seam: ``family`` (what differs between the model families: classes, processor, settings recorded, LoRA
targets), ``templates`` (LLaVA's conversations as chat templates), ``tiny`` (tiny random models for tests and the
demo), ``data`` (records -> chat messages -> processor inputs with labels on the assistant turns), ``prepare`` (tokens,
rows, LoRA and trainable GETok rows), ``trainer`` (trl's SFTTrainer with the box-token loss and GETok checkpoints),
``checkpoint`` (load a checkpoint back), ``generate`` (generation for predict), ``export`` (a standalone transformers
folder, LLaVA 1.2.x checkpoints as llava-hf), ``train`` (``python -m llava_getok.hf.train``).
"""
