"""Jinja chat templates, rendered as transformers renders them, and the choice of renderer for a run.

A tokenizer directory may ship its own template (`chat_template` in `tokenizer_config.json`, or
`chat_template.jinja`). Serving stacks (transformers, vLLM) format prompts with it, so SFT must train on
exactly that text. `JinjaChatTemplate` renders with the settings of transformers' `apply_chat_template`
(sandboxed environment, `trim_blocks`, `lstrip_blocks`, its `tojson`, `raise_exception`, `strftime_now`).

A template only gives text; which characters are the assistant's is found by rendering prefixes of the
conversation: for assistant message i, the text of messages[:i] with the generation prompt ends where the
turn begins, and the text of messages[:i+1] ends after it; the trainable part runs up to and including the
turn's last end-of-text token. This works for any template that renders a conversation's prefix as a prefix of
its text (Granite's does); one that doesn't is reported, not guessed at.
"""

from __future__ import annotations

import datetime
import functools
import json
import os

from granite_jax.data import chat
from granite_jax.data.chat import ChatFormatError, Conversation, Piece

BUILTIN_TEMPLATE_PATH = os.path.join(os.path.dirname(__file__), "granite4_chat_template.jinja")


class ChatTemplateError(ValueError):
    """A chat template cannot be loaded or does not render a conversation in a usable way."""


@functools.cache
def _environment():
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env


class JinjaChatTemplate:
    def __init__(self, source: str, *, origin: str = "<string>"):
        import jinja2

        self.source, self.origin = source, origin
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ChatTemplateError(f"chat template {origin}: syntax error on line {e.lineno}: {e.message}") from None

    def render_text(self, conversation: Conversation, *, add_generation_prompt: bool = False) -> str:
        import jinja2

        try:
            return self._template.render(messages=conversation.messages, tools=conversation.tools,
                                         documents=conversation.documents, add_generation_prompt=add_generation_prompt)
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"chat template {self.origin} failed: {e}") from None

    def render(self, conversation: Conversation, *, add_generation_prompt: bool = False) -> list[Piece]:
        """The rendered text in pieces; each assistant turn (through its last end-of-text) is trainable."""
        full = self.render_text(conversation, add_generation_prompt=add_generation_prompt)
        pieces, cursor = [], 0
        for index, message in enumerate(conversation.messages):
            if message["role"] != "assistant":
                continue
            before = self.render_text(Conversation(conversation.messages[:index], conversation.tools,
                                                   conversation.documents), add_generation_prompt=True)
            after = self.render_text(Conversation(conversation.messages[:index + 1], conversation.tools,
                                                  conversation.documents))
            end = after.rfind(chat.END_OF_TEXT) + len(chat.END_OF_TEXT)
            if not (full.startswith(after) and after.startswith(before) and cursor <= len(before) < end):
                raise ChatTemplateError(
                    f"chat template {self.origin} does not render messages[{index}] (assistant) as an extension of "
                    f"the conversation before it, ending in {chat.END_OF_TEXT}; cannot tell which tokens to train on")
            pieces += [Piece(full[cursor:len(before)], False), Piece(full[len(before):end], True)]
            cursor = end
        pieces.append(Piece(full[cursor:], False))
        return [p for p in pieces if p.text]


class BuiltinChatFormat:
    """The Granite 4.0 format written out in Python (`granite_jax.data.chat`)."""

    origin = "built-in Granite 4.0 format"

    def render(self, conversation: Conversation, *, add_generation_prompt: bool = False) -> list[Piece]:
        return chat.render(conversation, add_generation_prompt=add_generation_prompt)

    def render_text(self, conversation: Conversation, *, add_generation_prompt: bool = False) -> str:
        return chat.render_text(conversation, add_generation_prompt=add_generation_prompt)


def tokenizer_chat_template(tokenizer_path: str) -> JinjaChatTemplate | None:
    """The template shipped with a tokenizer directory (`chat_template.jinja` first, as transformers reads
    it, then `chat_template` in `tokenizer_config.json`), or None."""
    directory = tokenizer_path if os.path.isdir(tokenizer_path) else os.path.dirname(tokenizer_path)
    jinja_file = os.path.join(directory, "chat_template.jinja")
    if os.path.isfile(jinja_file):
        with open(jinja_file, encoding="utf-8") as f:
            return JinjaChatTemplate(f.read(), origin=jinja_file)
    config_file = os.path.join(directory, "tokenizer_config.json")
    if os.path.isfile(config_file):
        with open(config_file, encoding="utf-8") as f:
            template = json.load(f).get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
            template = {t.get("name"): t.get("template") for t in template}.get("default")
        if isinstance(template, str):
            return JinjaChatTemplate(template, origin=f"{config_file} (chat_template)")
    return None


def chat_format(setting: str, tokenizer_path: str) -> JinjaChatTemplate | BuiltinChatFormat:
    """`setting`: "auto" (the tokenizer's own template when it ships one, else the built-in format),
    "builtin", or the path of a Jinja template file."""
    if setting == "auto":
        return tokenizer_chat_template(tokenizer_path) or BuiltinChatFormat()
    if setting == "builtin":
        return BuiltinChatFormat()
    if not os.path.isfile(setting):
        raise ChatTemplateError(f"data.chat_template={setting!r}: expected 'auto', 'builtin' or a Jinja file path")
    with open(setting, encoding="utf-8") as f:
        return JinjaChatTemplate(f.read(), origin=setting)


__all__ = ["BuiltinChatFormat", "ChatFormatError", "ChatTemplateError", "JinjaChatTemplate", "chat_format",
           "tokenizer_chat_template", "BUILTIN_TEMPLATE_PATH"]
