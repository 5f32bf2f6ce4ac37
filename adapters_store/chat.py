"""Chat rendering shared by the server's /v1/chat/completions and the trainer's chat data, so that an
adapter trained on ``{"messages": [...]}`` records sees exactly the prompt format it is served with.

The base tokenizer's own chat template renders the messages to text, which is then tokenised without
adding special tokens again (the template already placed them).
"""

from __future__ import annotations


class NoChatTemplate(ValueError):
    """The base's tokenizer has no chat template."""


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise NoChatTemplate("this base model's tokenizer has no chat template")
    return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)


def chat_ids(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    """Token ids of the rendered conversation; with ``add_generation_prompt`` this is the prompt the
    server feeds the model for the next assistant turn."""
    text = render_chat(tokenizer, messages, add_generation_prompt)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
