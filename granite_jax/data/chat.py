"""The Granite 4.0 chat format: conversations checked, then rendered as text pieces marked trainable or not.

A conversation is the OpenAI / Hugging Face convention, one JSON object per SFT sample:

    {"messages": [{"role": "system" | "user" | "assistant" | "tool", "content": str | [{"type": "text",
                   "text": str}, ...] | null, "tool_calls": [...]?}, ...],
     "tools": [json-schema, ...]?, "documents": [{"title": ..., "text": ...}, ...]?}

Rendered (docs/fine-tuning.md#chat-format), each turn is
`<|start_of_role|>ROLE<|end_of_role|>CONTENT<|end_of_text|>\\n`. The first turn is always a system turn: the
conversation's own system text, the tools block and the documents block joined by blank lines, or the default
system prompt when there are none of the three. Assistant tool calls follow the content as
`<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>`; tool results become one user turn of
`\\n<tool_response>\\n...\\n</tool_response>` blocks per run of consecutive tool messages.

`render` returns the text as pieces: what the model must learn to produce (each assistant turn's content,
tool calls and closing `<|end_of_text|>`) is trainable, everything else (system, user, tool turns, the role
headers, the newline after each turn) is context. `granite_jax/data/granite4_chat_template.jinja` is the same
format as a Jinja chat template; the tests check that the two agree token for token through transformers'
`apply_chat_template`.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from granite_jax.data.sources import RecordError

START_OF_ROLE = "<|start_of_role|>"
END_OF_ROLE = "<|end_of_role|>"
END_OF_TEXT = "<|end_of_text|>"
SPECIAL_TOKENS = (START_OF_ROLE, END_OF_ROLE, END_OF_TEXT)
ROLES = ("system", "user", "assistant", "tool")
GENERATION_PROMPT = f"{START_OF_ROLE}assistant{END_OF_ROLE}"

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant. Please ensure responses are professional, accurate, and safe."
TOOLS_PREFIX = ("You are a helpful assistant with access to the following tools. You may call one or more tools to "
                "assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML "
                "tags:\n<tools>")
TOOLS_SUFFIX = ('\n</tools>\n\nFor each tool call, return a json object with function name and arguments within '
                '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": '
                '<args-json-object>}\n</tool_call>. If a tool does not exist in the provided list of tools, notify the '
                'user that you do not have the ability to fulfill the request.')
DOCUMENTS_PREFIX = ("You are a helpful assistant with access to the following documents. You may use one or more "
                    "documents to assist with the user query.\n\nYou are given a list of documents within "
                    "<documents></documents> XML tags:\n<documents>")
DOCUMENTS_SUFFIX = ("\n</documents>\n\nWrite the response to the user's input by strictly aligning with the facts in "
                    "the provided documents. If the information needed to answer the question is not available in the "
                    "documents, inform the user that the question cannot be answered based on the available data.")


class ChatFormatError(RecordError):
    """A conversation does not follow the chat convention; the message says which message and field."""


@dataclasses.dataclass(frozen=True)
class Conversation:
    messages: list[dict]
    tools: list[dict] | None = None
    documents: list[dict] | None = None


@dataclasses.dataclass(frozen=True)
class Piece:
    text: str
    trainable: bool


def to_json(value: Any) -> str:
    """JSON as transformers' chat-template `tojson` filter writes it (non-ASCII kept, `", "` / `": "`)."""
    return json.dumps(value, ensure_ascii=False)


def parse_conversation(record: Any, *, require_assistant: bool = True) -> Conversation:
    """Check one SFT sample (a decoded JSON object) and return it as a `Conversation`.

    Errors name the message index and field: a missing or non-list `messages`, an unknown role, content that
    is neither text nor a list of text parts, a tool call without a name or whose arguments are not a JSON
    object (or a string holding one), and — when `require_assistant` — no assistant turn to learn from.
    """
    if not isinstance(record, dict):
        raise ChatFormatError(f"expected a JSON object with a 'messages' list, got {type(record).__name__}")
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ChatFormatError("'messages' must be a non-empty list of {role, content} objects")
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise ChatFormatError(f"{where} is a {type(message).__name__}, expected an object")
        role = message.get("role")
        if role not in ROLES:
            raise ChatFormatError(f"{where}.role={role!r} is not one of {list(ROLES)}")
        _content_text(message.get("content"), where)
        calls = message.get("tool_calls")
        if calls:
            if role != "assistant":
                raise ChatFormatError(f"{where} has tool_calls but role {role!r}; only assistant turns call tools")
            if not isinstance(calls, list):
                raise ChatFormatError(f"{where}.tool_calls must be a list")
            for number, call in enumerate(calls):
                _tool_call_json(call, f"{where}.tool_calls[{number}]")
    if require_assistant and not any(m["role"] == "assistant" for m in messages):
        raise ChatFormatError("the conversation has no assistant turn, so nothing to learn from")
    for key in ("tools", "documents"):
        value = record.get(key)
        if value is not None and not (isinstance(value, list) and all(isinstance(v, dict) for v in value)):
            raise ChatFormatError(f"'{key}' must be a list of JSON objects, got {value!r:.80}")
    return Conversation(messages, record.get("tools") or None, record.get("documents") or None)


def _content_text(content: Any, where: str) -> str:
    """A message's text: a string, the text parts of a content list joined by newlines, or '' for null."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for number, part in enumerate(content):
            if not isinstance(part, dict):
                raise ChatFormatError(
                    f"{where}.content[{number}] must be an object like {{'type': 'text', 'text': ...}}")
            if part.get("type") == "text":
                if not isinstance(part.get("text"), str):
                    raise ChatFormatError(f"{where}.content[{number}].text must be a string")
                texts.append(part["text"])
        if content and not texts:  # only images, audio...: dropping them would leave an empty turn to train on
            kinds = sorted({str(part.get("type")) for part in content})
            raise ChatFormatError(f"{where}.content has no text part (only {kinds}): the model reads text; other "
                                  "parts are dropped, as transformers' Granite template drops them")
        return "\n".join(texts)
    raise ChatFormatError(f"{where}.content must be a string, a list of text parts or null, "
                          f"got {type(content).__name__}")


def _tool_call_json(call: Any, where: str) -> str:
    """`{"name": "NAME", "arguments": ARGS}` as the template writes it (string arguments are kept verbatim)."""
    if not isinstance(call, dict):
        raise ChatFormatError(f"{where} must be an object with 'name' and 'arguments'")
    function = call.get("function") or call
    name, arguments = function.get("name"), function.get("arguments")
    if not isinstance(name, str) or not name:
        raise ChatFormatError(f"{where} has no function name")
    if isinstance(arguments, str):
        try:
            decoded = json.loads(arguments)
        except json.JSONDecodeError as e:
            raise ChatFormatError(
                f"{where} ({name}): arguments are not valid JSON ({e.msg}): {arguments!r:.80}") from None
        if not isinstance(decoded, dict):
            raise ChatFormatError(f"{where} ({name}): arguments must be a JSON object, got {arguments!r:.80}")
        text = arguments
    elif isinstance(arguments, dict):
        text = to_json(arguments)
    else:
        raise ChatFormatError(f"{where} ({name}): arguments must be a JSON object, got {arguments!r:.80}")
    return '{"name": "' + name + '", "arguments": ' + text + "}"


def system_text(conversation: Conversation) -> str:
    """The first turn's text: own system text, tools block, documents block (joined by blank lines)."""
    parts = []
    first = conversation.messages[0]
    if first["role"] == "system":
        parts.append(_content_text(first.get("content"), "messages[0]"))
    if conversation.tools:
        parts.append(TOOLS_PREFIX + "".join("\n" + to_json(t) for t in conversation.tools) + TOOLS_SUFFIX)
    if conversation.documents:
        parts.append(DOCUMENTS_PREFIX + "".join("\n" + to_json(d) for d in conversation.documents) + DOCUMENTS_SUFFIX)
    text = "\n\n".join(parts)
    return text or DEFAULT_SYSTEM_PROMPT


def render(conversation: Conversation, *, add_generation_prompt: bool = False) -> list[Piece]:
    """The conversation as Granite 4.0 chat text, in pieces marked trainable (assistant output) or not."""
    pieces: list[Piece] = []

    def context(text: str) -> None:
        if pieces and not pieces[-1].trainable:
            pieces[-1] = Piece(pieces[-1].text + text, False)
        else:
            pieces.append(Piece(text, False))

    context(f"{START_OF_ROLE}system{END_OF_ROLE}{system_text(conversation)}{END_OF_TEXT}\n")
    messages = conversation.messages
    for index, message in enumerate(messages):
        role, where = message["role"], f"messages[{index}]"
        content = _content_text(message.get("content"), where)
        if role == "user" or (role == "system" and index > 0):
            context(f"{START_OF_ROLE}{role}{END_OF_ROLE}{content}{END_OF_TEXT}\n")
        elif role == "assistant":
            context(GENERATION_PROMPT)
            calls = [_tool_call_json(c, f"{where}.tool_calls[{n}]")
                     for n, c in enumerate(message.get("tool_calls") or [])]
            separator = "\n" if content else ""
            body = content + "".join((separator if n == 0 else "\n") + f"<tool_call>\n{call}\n</tool_call>"
                                     for n, call in enumerate(calls))
            pieces.append(Piece(body + END_OF_TEXT, True))
            context("\n")
        elif role == "tool":
            opens = index == 0 or messages[index - 1]["role"] != "tool"
            closes = index == len(messages) - 1 or messages[index + 1]["role"] != "tool"
            response = f"\n<tool_response>\n{content}\n</tool_response>"
            context((f"{START_OF_ROLE}user{END_OF_ROLE}" if opens else "") + response
                    + (f"{END_OF_TEXT}\n" if closes else ""))
    if add_generation_prompt:
        context(GENERATION_PROMPT)
    return pieces


def render_text(conversation: Conversation, *, add_generation_prompt: bool = False) -> str:
    return "".join(p.text for p in render(conversation, add_generation_prompt=add_generation_prompt))
