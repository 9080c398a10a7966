"""A chat template taken from a third party's tokenizer is untrusted code: rendering it is bounded in steps, time
and size, every way it can fail is one `ChatTemplateError` naming the template and the cause, and real templates
render byte for byte as they did before the bounds."""

from __future__ import annotations

import json
import re
import resource
import time

import jinja2
import jinja2.ext
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from granite_jax.data.chat import Conversation
from granite_jax.data.chat_template import BUILTIN_TEMPLATE_PATH, ChatTemplateError, JinjaChatTemplate

CONVERSATION = Conversation([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}])

# name: (template, what the error must say); every one of these hung, exhausted memory or escaped as a raw
# exception before the bounds.
HOSTILE = {
    "nested_loops": ("{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
                     r"more than \d+ steps"),
    "silent_nested_loops": ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
                            r"more than \d+ steps"),
    "string_repetition": ("{{ 'x' * 2000000000 }}", r"more than \d+ characters"),
    "list_repetition": ("{{ ([0] * 100000) * 100000 }}", r"more than \d+ characters"),
    "doubling_concatenation": ("{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
                               "{% endfor %}{{ ns.s | length }}", r"more than \d+ characters"),
    "output_into_a_set_block": ("{% set big %}{% for i in range(100000) %}{{ 'y' * 1000 }}{% endfor %}{% endset %}"
                                "{{ big | length }}", r"more than \d+ characters"),
    "replace_amplification": ("{% set s = 'x' * 100000 %}{{ s | replace('x', s) | length }}",
                              r"more than \d+ characters"),
    "join_amplification": ("{% set s = 'x' * 1000000 %}{{ range(100000) | join(s) | length }}",
                           r"more than \d+ characters"),
    "slice_count": ("{{ range(10) | slice(10 ** 10) | list }}", r"more than \d+ characters"),
    "padding_width": ("{{ 'x' | center(10 ** 10) }}", r"more than \d+ characters"),
    "method_padding_width": ("{{ 'x'.ljust(10 ** 10) | length }}", r"more than \d+ characters"),
    "format_width": ("{{ '%9999999999s' % 'x' }}", r"more than \d+ characters"),
    "tojson_indent": ("{% set d = [[[[[[[[[[1]]]]]]]]]] %}{{ (d * 1000) | tojson(indent=10000) | length }}",
                      r"more than \d+ characters"),
    "huge_power": ("{{ 10 ** (10 ** 10) }}", r"more than \d+ bits"),
    "huge_range": ("{{ range(10 ** 10) | list | length }}", r"OverflowError: Range too big.*100000"),
    "include": ("{% include 'other.jinja' %}", r"include"),
    "division_by_zero": ("{{ 1 / 0 }}", r"ZeroDivisionError"),
    "float_overflow": ("{{ (2 ** 10000) | float }}", r"OverflowError"),
    "type_error": ("{{ messages + 1 }}", r"TypeError"),
    "recursive_macro": ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", r"RecursionError"),
    "python_block_nesting": ("{% for a in messages %}" * 25 + "{% endfor %}" * 25, r"SyntaxError"),
    "parser_recursion": ("{{ " + "(" * 5000 + "1" + ")" * 5000 + " }}", r"RecursionError"),
}


def peak_memory_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


@pytest.mark.parametrize("source, cause", HOSTILE.values(), ids=list(HOSTILE))
def test_a_hostile_template_is_one_error_quickly_and_in_bounded_memory(source, cause):
    """Refused within seconds and 200 MB, as a one-line ChatTemplateError with the origin and the cause (the
    limit and its value, or the original exception), whether it fails compiling or rendering."""
    memory, start = peak_memory_bytes(), time.monotonic()
    with pytest.raises(ChatTemplateError) as error:
        JinjaChatTemplate(source, origin="hostile.jinja").render_text(CONVERSATION)
    assert time.monotonic() - start < 5
    assert peak_memory_bytes() - memory < 200 * 2**20
    message = str(error.value)
    assert message.startswith("chat template hostile.jinja") and "\n" not in message
    assert re.search(cause, message), message


def test_render_pieces_are_bounded_too():
    """`render` (the loss mask's prefix renders) goes through the same bounds as `render_text`."""
    template = JinjaChatTemplate(HOSTILE["nested_loops"][0], origin="hostile.jinja")
    start = time.monotonic()
    with pytest.raises(ChatTemplateError, match="steps"):
        template.render(CONVERSATION)
    assert time.monotonic() - start < 5


def unbounded_render(source: str, conversation: Conversation, add_generation_prompt: bool) -> str:
    """The renderer as it was before the bounds: transformers' environment, nothing counted."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = lambda value, ensure_ascii=False, indent=None, separators=None, sort_keys=False: (
        json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys))
    return env.from_string(source).render(messages=conversation.messages, tools=conversation.tools,
                                          documents=conversation.documents,
                                          add_generation_prompt=add_generation_prompt)


QWEN_STYLE = """\
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- elif messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and not message.content.startswith('<tool_response>') %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.role == "user" or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content | trim + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set content = message.content or '' %}
        {%- if '</think>' in content %}
            {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
        {%- endif %}
        {{- '<|im_start|>' + message.role + ('\\n' + content if content else '') }}
        {%- for tool_call in message.tool_calls or [] %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' ~ tool_call.name ~ '", "arguments": ' }}
            {{- tool_call.arguments if tool_call.arguments is string else tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or messages[loop.index0 - 1].role != "tool" %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1].role != "tool" %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# Everything the bounds touch (loops, recursive loops, macros and caller, set blocks, operators, formatting,
# filters and string methods with widths and separators), at sizes a template really uses.
KITCHEN_SINK = """\
{%- macro box(title) -%}[{{ title | center(12) }}|{{ caller() }}]{%- endmacro -%}
{%- set header %}{% for m in messages %}{{ m.role[0] | upper }}{% endfor %}{% endset -%}
{{ header }} {{ '%-6s|%5.2f|%03d' % ('ab', 3.14159, 7) }} {{ '{:>8}|{:^5}'.format('r', 'c') }}
{{ '=' * 10 }} {{ 2 ** 10 }} {{ 7 // 2 }} {{ 7 % 3 }} {{ 1 / 4 }} {{ 'a' ~ 1 ~ none }} {{ [1, 2] + [3] }}
{% for i in range(5) if i is odd %}{{ loop.cycle('x', 'y') }}{{ i }}{% if loop.last %}.{% endif %}{% endfor %}
{% for i in range(10) %}{% if i > 3 %}{% break %}{% endif %}{% if i == 1 %}{% continue %}{% endif %}{{ i }}{% endfor %}
{% call box('tools') %}{{ (tools or []) | map(attribute='function.name') | join(', ') }}{% endcall %}
{% for node in documents or [] recursive %}({{ node.title | replace(' ', '_') }}{{ loop(node.children or []) }})
{%- endfor %}
{{ messages | selectattr('role', 'equalto', 'user') | list | length }}
{{ messages[::-1] | map(attribute='role') | join }}
{{ (tools or [{}])[0] | tojson(indent=2) | indent(4) }}
{{ 'long words wrapped here' | wordwrap(10) }} {{ [1, 2, 3, 4, 5] | batch(2) | list }} {{ range(5) | slice(2) | list }}
{{ [[1], [2]] | sum(start=[]) }} {{ dict(b=1, a=2) | dictsort }} {{ 'a\\tb'.expandtabs(4) }} {{ '7'.zfill(3) }}
{{ '-'.join(['x', 'y']) }} {{ 'aXb'.replace('X', '--') }} {{ 'a,b'.split(',') }} {{ '{a}'.format_map({'a': 1}) }}
{{ 'x' | format() }} {{ '%s=%d' | format('n', 3) }} {{ messages | length is divisibleby 2 }} {{ -(3) }} {{ 2.5 * 2 }}
{{ '{s}/{budget}'.format(s=1, budget=2) }} {% for x in [] %}{% else %}empty{% endfor %} {{ undefined_name }}|
"""

CONVERSATIONS = [
    Conversation([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "  What is 2 + 2?  "},
                  {"role": "assistant", "content": "<think>easy</think>\n4"}]),
    Conversation(
        [{"role": "user", "content": "Weather in Oslo?"},
         {"role": "assistant", "content": None, "tool_calls": [
             {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
         {"role": "tool", "content": '{"temp": -3}'}, {"role": "assistant", "content": "-3°C."}],
        tools=[{"type": "function", "function": {"name": "get_weather", "description": "Weather (°C).",
                                                 "parameters": {"type": "object",
                                                                "properties": {"city": {"type": "string"}}}}}],
        documents=[{"doc_id": 1, "title": "Genesis one", "text": "In the beginning.",
                    "children": [{"title": "verse one"}, {"title": "verse two", "children": [{"title": "deep"}]}]}]),
]


def builtin_source() -> str:
    with open(BUILTIN_TEMPLATE_PATH, encoding="utf-8") as f:
        return f.read()


@pytest.mark.parametrize("name", ["builtin", "qwen_style", "kitchen_sink"])
@pytest.mark.parametrize("conversation", CONVERSATIONS, ids=["plain", "tools_documents"])
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_real_templates_render_exactly_as_before(name, conversation, add_generation_prompt):
    source = {"builtin": builtin_source(), "qwen_style": QWEN_STYLE, "kitchen_sink": KITCHEN_SINK}[name]
    expected = unbounded_render(source, conversation, add_generation_prompt)
    assert JinjaChatTemplate(source).render_text(conversation, add_generation_prompt=add_generation_prompt) == expected


def test_a_long_conversation_stays_far_inside_the_bounds():
    """2,000 messages, 1 MB of text (more than a 128k-token context) and a tool list render as before, and fast."""
    tools = CONVERSATIONS[1].tools * 20
    messages = [{"role": role, "content": f"turn {i} " + "words " * 80}
                for i, role in zip(range(2000), ["user", "assistant"] * 1000)]
    conversation = Conversation(messages, tools=tools)
    for source in (builtin_source(), QWEN_STYLE):
        start = time.monotonic()
        text = JinjaChatTemplate(source).render_text(conversation, add_generation_prompt=True)
        assert time.monotonic() - start < 2.5
        assert text == unbounded_render(source, conversation, True)
