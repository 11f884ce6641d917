"""Chat templates shipped with fastsft.

DEFAULT_CHAT_TEMPLATE is ChatML: ``<|im_start|>{role}\\n{content}<|im_end|>\\n``.
Assistant replies are wrapped in ``{% generation %}`` markers so Hugging Face's
``return_assistant_tokens_mask`` works too; fastsft's own masks do not need them
(they come from prefix rendering, see render.py).
"""
from __future__ import annotations

DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# The name DataOptions.chat_template accepts for DEFAULT_CHAT_TEMPLATE.
DEFAULT_TEMPLATE_NAME = "default"


def resolve_chat_template(option: str | None, tokenizer) -> str | None:
    """The template to render with: the option, the tokenizer's own, or None."""
    if option == DEFAULT_TEMPLATE_NAME:
        return DEFAULT_CHAT_TEMPLATE
    if option is not None:
        return option
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # several named templates: the "default" one renders chats
        own = own.get("default")
    return own or None
