"""Chat templates shipped with fastsft, and how the `chat_template` option picks one.

`chat_template` is one of:

- unset or ``tokenizer``: the tokenizer's own template;
- a name from NAMED_TEMPLATES (``default`` is kept as an alias of ``chatml``):
  a template written for fastsft that renders text conversations as the family's
  public template does (see the comment at the top of each file in
  fastsft/assets/templates; the one deliberate difference is Mistral's system
  prompt); the special tokens it needs must be in the tokenizer;
- a path to a ``.jinja`` file;
- the Jinja text itself (anything containing ``{%`` or ``{{``).

Anything else is an error that lists the names. Assistant replies in the shipped
templates sit in ``{% generation %}`` markers, so Hugging Face's
``return_assistant_tokens_mask`` works too; fastsft's own masks do not need them
(they come from prefix rendering, see render.py).
"""
from __future__ import annotations

import os
from importlib import resources

from fastsft.errors import ConfigError

TOKENIZER_TEMPLATE_NAME = "tokenizer"
DEFAULT_TEMPLATE_NAME = "default"  # the historical name of ChatML

# name -> (file in fastsft/assets/templates, tokens that must each be one token of the
# tokenizer, special-token attributes the template reads)
NAMED_TEMPLATES: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "chatml": ("chatml.jinja", ("<|im_start|>", "<|im_end|>"), ()),
    "llama3": ("llama3.jinja", ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"), ("bos_token",)),
    "llama3.1": ("llama3.1.jinja", ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"), ("bos_token",)),
    "qwen2.5": ("qwen2.5.jinja", ("<|im_start|>", "<|im_end|>"), ()),
    "qwen3": ("qwen3.jinja", ("<|im_start|>", "<|im_end|>", "<think>", "</think>"), ()),
    "mistral": ("mistral.jinja", (), ("bos_token", "eos_token")),
    "gemma": ("gemma.jinja", ("<start_of_turn>", "<end_of_turn>"), ("bos_token",)),
    "phi3": ("phi3.jinja", ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"), ("eos_token",)),
    "phi4": ("phi4.jinja", ("<|im_start|>", "<|im_sep|>", "<|im_end|>"), ()),
    "deepseek": ("deepseek.jinja", ("<｜User｜>", "<｜Assistant｜>", "<｜end▁of▁sentence｜>"), ("bos_token",)),
    "zephyr": ("zephyr.jinja", (), ("eos_token",)),
}


def template_names() -> list[str]:
    """Every name the chat_template option accepts."""
    return [TOKENIZER_TEMPLATE_NAME, *NAMED_TEMPLATES, DEFAULT_TEMPLATE_NAME]


def named_template(name: str) -> str:
    """The text of a shipped template."""
    filename = NAMED_TEMPLATES[name][0]
    return resources.files("fastsft").joinpath("assets", "templates", filename).read_text(encoding="utf-8")


DEFAULT_CHAT_TEMPLATE = named_template("chatml")


def is_template_text(value: str) -> bool:
    return "{%" in value or "{{" in value


def check_template_option(option: str | None) -> None:
    """Errors that need no tokenizer: an unknown name, a missing .jinja file."""
    _template_text(option)


def resolve_chat_template(option: str | None, tokenizer) -> str | None:
    """The template to render with: the option's, or the tokenizer's own; None when there is neither."""
    text = _template_text(option)
    if text is not None:
        if option in NAMED_TEMPLATES or option == DEFAULT_TEMPLATE_NAME:
            _check_tokens("chatml" if option == DEFAULT_TEMPLATE_NAME else option, tokenizer)
        return text
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # several named templates: the "default" one renders chats
        own = own.get("default")
    return own or None


def _template_text(option: str | None) -> str | None:
    """The Jinja text the option names, None for the tokenizer's own."""
    if option is None or option == TOKENIZER_TEMPLATE_NAME:
        return None
    if option == DEFAULT_TEMPLATE_NAME:
        return DEFAULT_CHAT_TEMPLATE
    if option in NAMED_TEMPLATES:
        return named_template(option)
    if is_template_text(option):
        check_template_syntax(option, "(the Jinja text)")
        return option
    if option.endswith(".jinja"):
        if not os.path.isfile(option):
            raise ConfigError(f"config key 'chat_template': no such template file: {option}")
        with open(option, encoding="utf-8") as handle:
            text = handle.read()
        check_template_syntax(text, option)
        return text
    raise ConfigError(
        f"config key 'chat_template': unknown template {option!r}; use one of {', '.join(template_names())}, "
        "a path to a .jinja file, or the Jinja text of a template"
    )


def check_template_syntax(text: str, where: str) -> None:
    """A template that does not compile is a config error naming its file and line (not 'example 0')."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.add_extension(_generation_tag())
    try:
        env.parse(text)
    except jinja2.TemplateSyntaxError as exc:
        raise ConfigError(f"config key 'chat_template': {where}, line {exc.lineno}: {exc.message}") from None


def _generation_tag():
    """transformers' {% generation %} ... {% endgeneration %} block, so templates that use it parse."""
    from jinja2 import nodes
    from jinja2.ext import Extension

    class GenerationTag(Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_render", []), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    return GenerationTag


def _check_tokens(name: str, tokenizer) -> None:
    _, tokens, attributes = NAMED_TEMPLATES[name]
    missing = [f"{attribute} (unset)" for attribute in attributes if getattr(tokenizer, attribute, None) is None]
    for token in tokens:
        ids = tokenizer(token, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:  # absent: the text would be split into ordinary tokens
            missing.append(token)
    if missing:
        raise ConfigError(
            f"config key 'chat_template': the {name} template needs special tokens the tokenizer lacks: "
            f"{', '.join(missing)} (add them to the tokenizer, or pick the template of its own family)"
        )
