"""The Granite 4.0 chat format: our renderer against transformers' `apply_chat_template` (same template text),
the assistant-only loss mask, and the errors for bad conversations and bad SFT files."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import TOKENIZER

from granite_jax.data.chat import (
    DEFAULT_SYSTEM_PROMPT,
    ChatFormatError,
    Conversation,
    parse_conversation,
    render,
    render_text,
)
from granite_jax.data.chat_template import BUILTIN_TEMPLATE_PATH, JinjaChatTemplate, chat_format
from granite_jax.data.sft import load_sft_samples
from granite_jax.data.sources import DataError
from granite_jax.data.tokenizer import load_tokenizer

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city (°C).",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}}}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
DOCUMENTS = [{"doc_id": 1, "title": "Genesis 1", "text": "In the beginning God created the heaven and the earth."},
             {"doc_id": 2, "title": "Psalms 23", "text": "The LORD is my shepherd; I shall not want."}]

CONVERSATIONS = {
    "plain": {"messages": [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi there!"}]},
    "system_multi_turn": {"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4"}, {"role": "user", "content": "And times 3?"},
        {"role": "assistant", "content": "12"}]},
    "tools_calls_responses": {"tools": [WEATHER, CLOCK], "messages": [
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "Weather in Paris and Rome, and the time?"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}},
            {"name": "get_time", "arguments": {}}]},
        {"role": "tool", "content": '{"temp": 21}'}, {"role": "tool", "content": '{"temp": 25}'},
        {"role": "tool", "content": "12:00"},
        {"role": "assistant", "content": "Paris 21°C, Rome 25°C; it is noon."}]},
    "tool_call_without_content": {"tools": [WEATHER], "messages": [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
        {"role": "tool", "content": '{"temp": -3}'}, {"role": "assistant", "content": "-3°C."}]},
    "documents": {"documents": DOCUMENTS, "messages": [
        {"role": "user", "content": "Who is my shepherd?"}, {"role": "assistant", "content": "The LORD."}]},
    "system_tools_documents": {"tools": [WEATHER], "documents": DOCUMENTS[:1], "messages": [
        {"role": "system", "content": "Answer from the documents."}, {"role": "user", "content": "First words?"},
        {"role": "assistant", "content": "In the beginning."}]},
    "content_parts_and_mid_system": {"messages": [
        {"role": "system", "content": [{"type": "text", "text": "Line one."}, {"type": "text", "text": "Line two."}]},
        {"role": "user",
         "content": [{"type": "text", "text": "Hi"}, {"type": "image"}, {"type": "text", "text": "you"}]},
        {"role": "assistant", "content": "Hello."}, {"role": "system", "content": "Now answer in French."},
        {"role": "user", "content": "Thanks"}, {"role": "assistant", "content": "Merci."}]},
    "empty_system_falls_back_to_default": {"messages": [
        {"role": "system", "content": ""}, {"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]},
}


@pytest.fixture(scope="module")
def hf_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZER)


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_renderer_matches_transformers_apply_chat_template(hf_tokenizer, name, add_generation_prompt):
    """Our Python renderer and our Jinja rendering both give transformers' tokens for the same template."""
    sample = CONVERSATIONS[name]
    with open(BUILTIN_TEMPLATE_PATH) as f:
        template = f.read()
    assert hf_tokenizer.chat_template == template  # the bundled tokenizer ships the built-in template
    expected_text = hf_tokenizer.apply_chat_template(
        sample["messages"], tools=sample.get("tools"), documents=sample.get("documents"), chat_template=template,
        tokenize=False, add_generation_prompt=add_generation_prompt)
    expected_ids = hf_tokenizer.apply_chat_template(
        sample["messages"], tools=sample.get("tools"), documents=sample.get("documents"), chat_template=template,
        tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=False)
    conversation = parse_conversation(sample)
    ours = render_text(conversation, add_generation_prompt=add_generation_prompt)
    assert ours == expected_text
    assert JinjaChatTemplate(template).render_text(conversation, add_generation_prompt=add_generation_prompt) == ours
    assert load_tokenizer(TOKENIZER).encode(ours) == list(expected_ids)


def test_rendering_matches_the_documented_format():
    """Hand-written expectation from docs/fine-tuning.md#chat-format (default system prompt, tool call
    and merged tool responses, generation prompt)."""
    conversation = parse_conversation(CONVERSATIONS["tool_call_without_content"])
    tools_json = json.dumps(WEATHER, ensure_ascii=False)
    text = render_text(conversation, add_generation_prompt=True)
    assert text.startswith("<|start_of_role|>system<|end_of_role|>You are a helpful assistant with access to the "
                           "following tools.")
    assert f"<tools>\n{tools_json}\n</tools>" in text
    assert text.endswith(
        "<|start_of_role|>user<|end_of_role|>Weather in Oslo?<|end_of_text|>\n"
        '<|start_of_role|>assistant<|end_of_role|><tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n'
        "</tool_call><|end_of_text|>\n"
        '<|start_of_role|>user<|end_of_role|>\n<tool_response>\n{"temp": -3}\n</tool_response><|end_of_text|>\n'
        "<|start_of_role|>assistant<|end_of_role|>-3°C.<|end_of_text|>\n<|start_of_role|>assistant<|end_of_role|>")
    plain = render_text(parse_conversation(CONVERSATIONS["plain"]))
    assert plain == (f"<|start_of_role|>system<|end_of_role|>{DEFAULT_SYSTEM_PROMPT}<|end_of_text|>\n"
                     "<|start_of_role|>user<|end_of_role|>Hello<|end_of_text|>\n"
                     "<|start_of_role|>assistant<|end_of_role|>Hi there!<|end_of_text|>\n")


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_template_pieces_equal_builtin_pieces(name):
    """Assistant spans found by rendering prefixes through the Jinja template = the built-in renderer's."""
    conversation = parse_conversation(CONVERSATIONS[name])
    with open(BUILTIN_TEMPLATE_PATH) as f:
        template = JinjaChatTemplate(f.read())
    assert template.render(conversation) == render(conversation)


def test_a_preference_pair_renders_each_distinct_prefix_once(monkeypatch):
    """A pair's two replies share their prompt, and finding a reply's tokens renders the conversation's prefixes:
    the template renders the 4 distinct texts (prompt, prompt + generation prompt, prompt + each reply) once
    each, not 8 times, and gives the texts it gives uncached."""
    from granite_jax.data.preference import reply_pieces

    with open(BUILTIN_TEMPLATE_PATH) as f:
        source = f.read()
    prompt = [{"role": "user", "content": "Name a prime."}]
    replies = [[{"role": "assistant", "content": "7"}], [{"role": "assistant", "content": "8"}]]
    uncached = []
    for reply in replies:
        template = JinjaChatTemplate(source)  # a fresh template per reply: nothing to reuse
        uncached.append(reply_pieces(prompt, reply, template))
    template, renders = JinjaChatTemplate(source), []
    real_render = template._render
    monkeypatch.setattr(template, "_render", lambda *a: renders.append(a) or real_render(*a))
    assert [reply_pieces(prompt, reply, template) for reply in replies] == uncached
    assert len(renders) == 4
    assert reply_pieces(prompt, [{"role": "assistant", "content": "9"}], template)[-2].text == "9<|end_of_text|>"
    assert len(renders) == 5  # a new reply renders again

def test_loss_mask_covers_exactly_the_assistant_tokens(tmp_path):
    sample = CONVERSATIONS["tools_calls_responses"]
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps(sample) + "\n")
    tokenizer = load_tokenizer(TOKENIZER)
    [row], stats = load_sft_samples([str(path)], chat_format("auto", TOKENIZER), tokenizer, seq_len=1024,
                                    vocab_size=4096)
    weights, targets, inputs = row["loss_weights"], row["targets"], row["input_ids"]
    assert np.array_equal(inputs[1:], targets[:-1])
    trained = targets[weights > 0]
    expected = ('Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
                '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>\n'
                '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call><|end_of_text|>'
                "Paris 21°C, Rome 25°C; it is noon.<|end_of_text|>")
    assert tokenizer.decode(trained) == expected
    # Two contiguous runs of weight 1 (one per assistant turn), each starting right after the role header.
    edges = np.flatnonzero(np.diff(np.concatenate([[0], weights, [0]])))
    assert len(edges) == 4
    for start in edges[::2]:
        assert tokenizer.decode(inputs[max(0, start - 3):start + 1]).endswith("assistant<|end_of_role|>")
    untrained = tokenizer.decode(targets[weights == 0])
    for context in ("Use tools.", "Weather in Paris and Rome", "<tool_response>", '{"temp": 21}', "get_weather\""):
        assert context in untrained
    assert stats.trainable_tokens == int(weights.sum()) and stats.conversations == 1


BAD_LINES = [
    ('{"messages": [{"role": "user", "content": "hi"}', "not valid JSON"),
    ('{"messages": [{"role": "narrator", "content": "hi"}, {"role": "assistant", "content": "x"}]}',
     "messages[0].role='narrator' is not one of"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant turn"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": null, "tool_calls": '
     '[{"function": {"name": "f", "arguments": "{city: Paris"}}]}]}',
     "messages[1].tool_calls[0] (f): arguments are not valid JSON"),
    ('{"messages": []}', "non-empty list"),
    ('["not", "an", "object"]', "expected a JSON object"),
    ('{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png"}}]}, '
     '{"role": "assistant", "content": "A cat."}]}', "messages[0].content has no text part (only ['image_url'])"),
]


@pytest.mark.parametrize("line,message", BAD_LINES)
def test_bad_lines_are_reported_with_their_line_number(tmp_path, line, message):
    good = json.dumps(CONVERSATIONS["plain"])
    path = tmp_path / "chat.jsonl"
    path.write_text(f"{good}\n\n{line}\n{good}\n")
    args = dict(chat_format=chat_format("auto", TOKENIZER), tokenizer=load_tokenizer(TOKENIZER), seq_len=256,
                vocab_size=4096)
    with pytest.raises(DataError, match=rf"chat.jsonl:3: .*{_escape(message)}.*data.bad_lines=skip"):
        load_sft_samples([str(path)], **args)
    samples, stats = load_sft_samples([str(path)], bad_lines="skip", **args)
    assert len(samples) == 2 and len(stats.bad_lines) == 1 and ":3: " in stats.bad_lines[0]
    assert "1 bad lines skipped" in stats.summary(256)


def _escape(text: str) -> str:
    import re

    return re.escape(text)


def test_overlong_samples_are_truncated_or_dropped_and_counted(tmp_path):
    long = {"messages": [{"role": "user", "content": "word " * 400}, {"role": "assistant", "content": "ok " * 200}]}
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(s) for s in [CONVERSATIONS["plain"], long, long]) + "\n")
    args = dict(chat_format=chat_format("builtin", TOKENIZER), tokenizer=load_tokenizer(TOKENIZER), vocab_size=4096)
    samples, stats = load_sft_samples([str(path)], seq_len=600, overlong="truncate", **args)
    assert stats.truncated == 2 and [len(s["input_ids"]) for s in samples[1:]] == [600, 600]
    samples, stats = load_sft_samples([str(path)], seq_len=600, overlong="drop", **args)
    assert stats.dropped_overlong == 2 and len(samples) == 1
    # Truncated before the assistant turn begins: nothing to learn, dropped and counted.
    samples, stats = load_sft_samples([str(path)], seq_len=200, overlong="truncate", **args)
    assert stats.dropped_untrainable == 2 and len(samples) == 1


def test_tokenizer_without_chat_tokens_is_refused(tmp_path):
    from granite_jax.data.tokenizer import train_sentencepiece

    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(f"line {i} of some text to train on, with words" for i in range(300)))
    model = train_sentencepiece([str(corpus)], 400, str(tmp_path / "sp"))
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps(CONVERSATIONS["plain"]) + "\n")
    with pytest.raises(DataError, match=r"splits '<\|start_of_role\|>' into \d+ tokens"):
        load_sft_samples([str(path)], chat_format("auto", model), load_tokenizer(model), seq_len=64, vocab_size=4096)


def test_conversation_errors_name_the_message():
    with pytest.raises(ChatFormatError, match=r"messages\[2\] has tool_calls but role 'user'"):
        parse_conversation({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                         {"role": "user", "content": "c",
                                          "tool_calls": [{"name": "f", "arguments": {}}]}]})
    with pytest.raises(ChatFormatError, match=r"arguments must be a JSON object"):
        parse_conversation({"messages": [{"role": "assistant", "tool_calls": [{"name": "f", "arguments": "[1]"}]}]})
    with pytest.raises(ChatFormatError, match=r"messages\[0\].content must be a string"):
        parse_conversation({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "b"}]})
    with pytest.raises(ChatFormatError, match=r"'tools' must be a list of JSON objects"):
        parse_conversation({"tools": "get_weather", "messages": [{"role": "assistant", "content": "b"}]})
    assert render_text(Conversation([{"role": "user", "content": "q"}]), add_generation_prompt=True).endswith(
        "<|start_of_role|>user<|end_of_role|>q<|end_of_text|>\n<|start_of_role|>assistant<|end_of_role|>")
