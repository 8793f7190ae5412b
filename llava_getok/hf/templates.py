"""Chat templates this backend writes: LLaVA's ``SeparatorStyle.TWO`` conversations (``vicuna_v1``, ``llava_v1``,
``getok_v1``, ...) as Jinja, for llava-hf models trained or exported here, so that a model's chat template renders
exactly the conversation it was trained on."""
from __future__ import annotations

import json

# LLaVA-1.5's own conversation (LLaVA's conv_vicuna_v1, SeparatorStyle.TWO) as a chat template: the system prompt,
# "USER: <image>\n..." and "ASSISTANT: ...</s>", so the model learns to stop as LLaVA's models do.
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
                 "detailed, and polite answers to the user's questions.")


# LLaVA tokenizes the text after each image on its own (``tokenizer_image_token`` splits the prompt at ``<image>``), so
# that text starts with sentencepiece's word-boundary piece ("\u2581") where one tokenizer call over the whole prompt
# writes none: a space after the placeholder gives a fast LLaMA tokenizer LLaVA's very ids.
LLAVA_IMAGE = "<image> \n"


def two_separator_template(system: str, roles=("USER", "ASSISTANT"), sep: str = " ", sep2: str = "</s>",
                           image: str = "<image>\n") -> str:
    """A chat template that renders LLaVA's ``SeparatorStyle.TWO`` conversations as LLaVA's ``Conversation.get_prompt``
    does: ``system + sep`` (nothing for an empty system), then ``ROLE: text`` followed by ``sep`` after a user turn
    and ``sep2`` after an assistant turn; a message's images come first, each as ``image``.

    ``image`` is ``<image>\\n`` for the model's own training; for a model LLaVA trained it is :data:`LLAVA_IMAGE`."""
    user, assistant = (json.dumps(r) for r in roles)
    return (
        "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
        "{% set messages = messages[1:] %}{% else %}{% set system = " + json.dumps(system) + " %}{% endif %}"
        "{% if system %}{{ system }}{{ " + json.dumps(sep) + " }}{% endif %}"
        "{% for message in messages %}{% if message['role'] == 'user' %}{{ " + user + " }}{% else %}{{ " + assistant +
        " }}{% endif %}{{ ': ' }}"
        "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
        "{% for c in message['content'] %}{% if c['type'] == 'image' %}{{ " + json.dumps(image) + " }}{% endif %}"
        "{% endfor %}"
        "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
        "{% endif %}{% if message['role'] == 'user' %}{{ " + json.dumps(sep) + " }}{% else %}{{ " + json.dumps(sep2) +
        " }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ " + assistant + " + ':' }}{% endif %}"
    )
