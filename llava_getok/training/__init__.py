"""The training core that every backend shares: the run's settings (declared once), the location tokens in a
tokenizer and their embedding rows (added, initialised, trained as deltas, saved), the loss of one step (LM loss on
the labelled positions plus the box-token or bins loss, on tensors and a head callable), and the checkpoint's
sidecar. It imports torch and transformers, never ``llava``: a backend (``llava_getok.llava`` for LLaVA 1.2.x) says
how its model is built, where its labels and hidden states come from and how its checkpoints are laid out.
"""
