"""What one LLaVA forward hands the training step (:class:`llava_getok.training.step.Captured`).

The labels that line up with the logits exist only inside LLaVA's forward (``prepare_inputs_labels_for_multimodal``
inserts the image positions and re-pads), and the forward must run through whatever wraps the model (DDP's gradient
reducer, DeepSpeed ZeRO-3's parameter gathering, gradient checkpointing, peft). So :func:`capture` installs two
patches for one forward and takes them off after it: LLaVA's ``prepare_inputs_labels_for_multimodal`` on the
instance (records the labels it returns) and a forward pre-hook on the LM head (records its input, the hidden
states). Outside the ``with`` block the model is as it was.

``lean`` (training, nobody reads the logits): the labels are also withheld from LLaMA and its LM head gets the last
position only, so the forward computes neither the full (B, T, V) logits nor its loss; the step scores the labelled
positions from the hidden states instead.
"""
from __future__ import annotations

import contextlib

from ..patching import Patches
from ..training.step import Captured


class LlavaForward:
    """The labels and the LM head's input of the forward run inside :func:`capture`."""

    labels = hidden = None

    def captured(self, outputs, lm, labels=None) -> Captured:
        """The step's input from the forward's ``outputs`` and LM loss ``lm`` (None in the lean mode); ``labels``:
        the batch's own, for a forward that did not go through LLaVA's multimodal preparation."""
        own = self.labels if self.labels is not None else labels
        return Captured(own, hidden=self.hidden, logits=outputs.logits if self.hidden is None else None, lm=lm)


@contextlib.contextmanager
def capture(llava, lean: bool):
    """Record one forward of ``llava`` (the unwrapped LlavaLlamaForCausalLM); yields a :class:`LlavaForward`."""
    forward = LlavaForward()
    prepare = llava.prepare_inputs_labels_for_multimodal

    def prepare_and_record(*args, **kwargs):
        out = prepare(*args, **kwargs)
        if out[-1] is not None:
            forward.labels = out[-1]
            if lean:  # no loss in LLaMA's forward: the step computes it
                out = (*out[:-1], None)
        return out

    def record_head_input(module, args):
        forward.hidden = args[0]
        if lean and forward.labels is not None:
            return (args[0][:, -1:],)  # the logits of the last position only; the step scores the rest

    patches = Patches()
    with patches.applied():
        patches.replace(llava, "prepare_inputs_labels_for_multimodal", prepare_and_record,
                        why="record the labels LLaVA aligns with the logits, for this forward")
        head = llava.get_output_embeddings()
        patches.hook(head.register_forward_pre_hook(record_head_input), f"{type(head).__name__}: forward pre-hook",
                     why="record the LM head's input (the hidden states), for this forward")
        yield forward
