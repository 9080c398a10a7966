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

A template from a tokenizer directory is someone else's code, so its rendering is bounded (steps, time, the size
of values and of the output: `MAX_STEPS` and below), and anything that goes wrong, a limit included, is one
`ChatTemplateError` naming the template and the cause.
"""

from __future__ import annotations

import collections
import contextvars
import datetime
import functools
import inspect
import itertools
import json
import os
import re
import threading
import time

from granite_jax.data import chat
from granite_jax.data.chat import ChatFormatError, Conversation, Piece

BUILTIN_TEMPLATE_PATH = os.path.join(os.path.dirname(__file__), "granite4_chat_template.jinja")


class ChatTemplateError(ValueError):
    """A chat template cannot be loaded or does not render a conversation in a usable way."""


# A template from a tokenizer directory is someone else's code: each render is bounded, deterministically where it
# can be. Real templates stay far inside: the built-in one renders a short conversation in under 1 ms, and a
# 2,000-message, 1 MB conversation with 20 tools in 0.05-0.1 s (0.02-0.03 s unbounded), in 14,000 steps,
# writing 2.1 M characters.
MAX_STEPS = 1_000_000  # loop iterations, calls, filters and operators: 0.5-1 s of the most trivial ones
MAX_SECONDS = 5.0  # wall clock, checked at every step: for steps each slow but within the size bounds
MAX_CHARS = 2**25  # 33.5 M characters, some 60 times a 128k-token context: the size of any value (strings, and
# containers as written out), the size computed beforehand of an operation that multiplies its inputs' sizes
# (repetition, widths, separators, replacements), and the total of the output (into macros and set blocks too)
MAX_INT_BITS = 2**16  # integers of ~20,000 digits: arithmetic beyond gets slow


class _LimitExceeded(Exception):
    """A render went past one of the limits above; the message names it and its value."""


# The budget of the render running in this thread (or task). Unset outside `render_text`: jinja evaluates a filter
# of constants when it compiles the template, and where that raises (here LookupError, from `_budget()`) it leaves
# the filter to render time, within the budget.
_BUDGET: contextvars.ContextVar[_Budget] = contextvars.ContextVar("chat_template_budget")


class _Budget:
    """One render's account: steps taken, characters written, the deadline, and the sizes of the conversation's
    containers (measured once up front, so that `messages | length` in a loop does not walk the messages again)."""

    def __init__(self, inputs):
        self.steps = self.written = 0
        self.deadline = time.monotonic() + MAX_SECONDS
        self.known: dict[int, int] = {}
        for value in inputs:
            self._measure(value, self.known)

    def step(self):
        self.steps += 1
        if self.steps > MAX_STEPS:
            raise _LimitExceeded(f"more than {MAX_STEPS} steps (loop iterations, calls, filters and operators)")
        self.tick()

    def tick(self):
        if time.monotonic() > self.deadline:
            raise _LimitExceeded(f"more than {MAX_SECONDS} s of rendering")

    def stepped(self, item):
        self.step()
        return item

    def write(self, text: str) -> str:
        """`text`, counted as output."""
        self.written += len(text)
        if self.written > MAX_CHARS:
            raise _LimitExceeded(f"more than {MAX_CHARS} characters of output")
        return text

    def size(self, value) -> int:
        """Characters `value` takes written out; refused past MAX_CHARS."""
        return _within(len(value)) if isinstance(value, str) else self._measure(value, {})

    def sizes(self, args, kwargs):
        for value in (*args, *kwargs.values()):
            self.size(value)

    def checked(self, value):
        self.size(value)
        return value

    def _measure(self, value, seen: dict[int, int]) -> int:
        """Strings their length, integers their digits, containers 2 per item plus their items in full (a part
        shared n times counts n times, as it is written; each container is walked once per call via `seen`),
        a namespace its attributes (its str shows them), anything else 24 (a float's longest repr)."""
        if isinstance(value, (str, bytes)):
            return _within(len(value))
        if isinstance(value, int):
            if value.bit_length() > MAX_INT_BITS:
                raise _LimitExceeded(f"an integer of more than {MAX_INT_BITS} bits")
            return value.bit_length() // 3 + 1
        from jinja2.utils import Namespace

        if isinstance(value, Namespace):
            value = object.__getattribute__(value, "_Namespace__attrs")
        if not isinstance(value, (list, tuple, dict, set, frozenset)):
            return 24
        size = self.known.get(id(value)) or seen.get(id(value))
        if size is None:
            size = 2
            for item in itertools.chain.from_iterable(value.items()) if isinstance(value, dict) else value:
                size = _within(size + 2 + (len(item) if type(item) is str else self._measure(item, seen)))
            seen[id(value)] = size
        return size


def _budget() -> _Budget:
    return _BUDGET.get()


def _within(size: int) -> int:
    if size > MAX_CHARS:
        raise _LimitExceeded(f"a value of more than {MAX_CHARS} characters")
    return size


def _width(value) -> int:
    """A width or count argument as characters (jinja's `indent` also takes a string)."""
    return max(value, 0) if isinstance(value, int) else len(str(value))


def _repetition_size(budget: _Budget, left, right) -> int:
    """The size of `left * right` where it repeats a sequence (the count on either side), else 0."""
    for sequence, count in ((left, right), (right, left)):
        if isinstance(sequence, (str, bytes, list, tuple)) and isinstance(count, int):
            return budget.size(sequence) * count
    return 0


def _power_bits(left, right) -> int:
    """About the bits of `left ** right` for integers (0 where it cannot grow: floats, |left| <= 1)."""
    if isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
        return right * abs(left).bit_length()
    return 0


_NUMBER = re.compile(r"\d+")
_WIDTH_FROM_OPERANDS = re.compile(r"\*|\{[^{}]*\{")  # `%*d`, `{:{}}`


def _format_size(budget: _Budget, form: str, operands) -> int:
    """An upper bound on the length of `form` %- or {}-formatted with `operands`: its text, every number written
    in it (a width or precision pads to that many characters), the operands, and their integers too where a width
    is taken from them. A mapping's values are operands."""
    values = [v for o in operands for v in (o.values() if isinstance(o, dict) else [o])]
    size = len(form) + sum(int(n) if len(n) < 10 else MAX_CHARS for n in _NUMBER.findall(form))
    size += sum(budget.size(v) for v in values)
    if _WIDTH_FROM_OPERANDS.search(form):
        size += sum(abs(v) for v in values if isinstance(v, int))
    return size


def _replace_size(text, old, new) -> int:
    text, old, new = str(text), str(old), str(new)
    return len(text) + text.count(old) * max(len(new) - len(old), 0)


def _join_size(budget: _Budget, arguments: dict, items: str, separator) -> int:
    """The size of joining `arguments[items]`, which becomes a list here (a generator could not be measured)."""
    arguments[items] = values = list(arguments[items])
    return budget.size(values) + len(str(separator)) * len(values)


def _sum_size(budget: _Budget, arguments: dict) -> int:
    """`sum` of lists or strings copies the total once per item; of numbers it is bounded by `_measure`."""
    arguments["iterable"] = values = list(arguments["iterable"])
    return 0 if isinstance(arguments["start"], (int, float)) else budget.size(values) * len(values)


# Sizes, computed before the call, of the filters and str methods whose result can be a product of their inputs'
# sizes (a filter's arguments are bound to its signature, defaults applied; a method gets its str and arguments).
_FILTER_SIZES = {
    "replace": lambda budget, a: _replace_size(a["s"], a["old"], a["new"]),
    "join": lambda budget, a: _join_size(budget, a, "value", a["d"]),
    "sum": _sum_size,
    "indent": lambda budget, a: (len(str(a["s"])) + 1) * (_width(a["width"]) + 1),
    "wordwrap": lambda budget, a: len(str(a["s"])) * (len(str(a["wrapstring"] or "\n")) + 1),
    "center": lambda budget, a: len(str(a["value"])) + _width(a["width"]),
    "batch": lambda budget, a: budget.size(a["value"]) + _width(a["linecount"]),
    "slice": lambda budget, a: budget.size(a["value"]) + _width(a["slices"]),
    "format": lambda budget, a: _format_size(budget, str(a["value"]), (*a["args"], a["kwargs"])),
}
_STR_METHOD_SIZES = {  # positional-only, as the methods are (`'{s}'.format(s=1)` must not bind `s` here)
    "replace": lambda budget, s, old, new, count=-1, /: _replace_size(s, old, new),
    "expandtabs": lambda budget, s, /, tabsize=8: len(s) * (_width(tabsize) + 1),
    "center": lambda budget, s, width, fillchar=" ", /: len(s) + _width(width),
    "ljust": lambda budget, s, width, fillchar=" ", /: len(s) + _width(width),
    "rjust": lambda budget, s, width, fillchar=" ", /: len(s) + _width(width),
    "zfill": lambda budget, s, width, /: len(s) + _width(width),
    "format": lambda budget, s, /, *args, **kwargs: _format_size(budget, s, (*args, kwargs)),
    "format_map": lambda budget, s, mapping, /: _format_size(budget, s, (mapping,)),
}


def _str_method(function) -> tuple[str | None, str | None]:
    """(the str, the method's name) if `function` is a bound str method (the sandbox wraps `format`), else Nones."""
    method = getattr(function, "__wrapped__", function)
    owner = getattr(method, "__self__", None)
    return (owner, method.__name__) if isinstance(owner, str) else (None, None)


def _call_arguments(budget: _Budget, function, args: tuple, kwargs: dict) -> tuple:
    """`args`, measured with `kwargs` and the call's result size estimated; a str `join`'s iterable becomes a
    list first, so that its size is known."""
    owner, name = _str_method(function)
    if name == "join" and args:
        args = (list(args[0]), *args[1:])
        _within(budget.size(args[0]) + len(owner) * len(args[0]))
    budget.sizes(args, kwargs)
    if name in _STR_METHOD_SIZES:
        _within(_STR_METHOD_SIZES[name](budget, owner, *args, **kwargs))
    return args


def _bounded_filter(name: str, function):
    """`function` (the filter `name`) as one step, its arguments and result measured, and its result's size
    computed beforehand where it can multiply its inputs."""
    estimate = _FILTER_SIZES.get(name)
    own = inspect.unwrap(function)
    signature = inspect.signature(own)
    if hasattr(own, "jinja_pass_arg"):  # its first parameter takes what jinja passes, not the filter's arguments
        signature = signature.replace(parameters=list(signature.parameters.values())[1:])
    passed = 1 if hasattr(function, "jinja_pass_arg") else 0  # the context, eval context or environment, if any

    @functools.wraps(function)  # keeps jinja's pass_context / pass_eval_context / pass_environment marks
    def bounded(*args, **kwargs):
        budget = _budget()
        budget.step()
        budget.sizes(args, kwargs)
        if estimate:
            bound = signature.bind(*args[passed:], **kwargs)
            bound.apply_defaults()
            _within(estimate(budget, bound.arguments))
            args, kwargs = (*args[:passed], *bound.args), bound.kwargs
        return budget.checked(function(*args, **kwargs))

    return bounded


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    """transformers' `tojson` (`json.dumps` with these defaults), encoded piece by piece so that a large `indent`
    over a deep value stops at MAX_CHARS instead of being built whole."""
    encoder = json.JSONEncoder(ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    budget, chunks, length = _budget(), [], 0
    for chunk in encoder.iterencode(value):
        length = _within(length + len(chunk))
        budget.tick()
        chunks.append(chunk)
    return "".join(chunks)


def _iterate(iterable):
    """A for loop's items, one step each."""
    return map(_budget().stepped, iterable)


def _output(value) -> str:
    """A piece of output, measured before jinja's `str` writes it out, and counted."""
    budget = _budget()
    budget.step()
    budget.size(value)
    return budget.write(str(value))


def _checked(value):
    """An operand of `~`, measured before `~` writes it out."""
    return _budget().checked(value)


# Filters no template can name (a filter's name is identifiers and dots), which `_bound_tree` inserts: direct
# calls, unlike a call through the sandbox.
_INTERNAL_FILTERS = {"bounded:iterate": _iterate, "bounded:output": _output, "bounded:checked": _checked}


def _bound_tree(tree):
    """Routes every for loop's iterable, every piece of output (output into macros and set blocks included) and
    every operand of `~` through `_iterate`, `_output` and `_checked`. Refuses include, import and extends: a chat
    template is one file, there is nothing to load."""
    from jinja2 import nodes
    from jinja2.exceptions import TemplateAssertionError

    for node in tree.find_all((nodes.Extends, nodes.Include, nodes.Import, nodes.FromImport)):
        raise TemplateAssertionError("a chat template is one file: include, import and extends are not supported",
                                     node.lineno)

    def through(name, node):
        return nodes.Filter(node, f"bounded:{name}", [], [], None, None, lineno=node.lineno)

    for loop in list(tree.find_all(nodes.For)):
        loop.iter = through("iterate", loop.iter)
    for output in list(tree.find_all(nodes.Output)):
        output.nodes = [through("output", node) for node in output.nodes]
    for concat in list(tree.find_all(nodes.Concat)):
        concat.nodes = [through("checked", node) for node in concat.nodes]


@functools.cache
def _environment_class():
    """transformers' sandbox, bounded: each call, filter, operator and loop iteration is a budget step, their
    arguments and results are measured, and the operators that multiply sizes are sized beforehand."""
    from jinja2.compiler import CodeGenerator
    from jinja2.runtime import LoopContext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class BoundedCodeGenerator(CodeGenerator):
        def visit_Template(self, node, frame=None):
            _bound_tree(node)
            super().visit_Template(node, frame)

    class BoundedEnvironment(ImmutableSandboxedEnvironment):
        code_generator_class = BoundedCodeGenerator
        # intercepted, they are also no longer folded at compile time, outside any budget
        intercepted_binops = frozenset(["+", "-", "*", "/", "//", "**", "%"])

        def call(__self, __context, __obj, *args, **kwargs):  # jinja's names: none can clash with kwargs
            budget = _budget()
            budget.step()
            if isinstance(__obj, LoopContext) and args:  # `loop(children)` in a recursive for
                args = (_iterate(args[0]), *args[1:])
            args = _call_arguments(budget, __obj, args, kwargs)
            return budget.checked(super().call(__context, __obj, *args, **kwargs))

        def call_binop(self, context, operator, left, right):
            budget = _budget()
            budget.step()
            budget.sizes((left, right), {})
            if operator == "*":
                _within(_repetition_size(budget, left, right))
            elif operator == "**" and _power_bits(left, right) > MAX_INT_BITS:
                raise _LimitExceeded(f"an integer of more than {MAX_INT_BITS} bits")
            elif operator == "%" and isinstance(left, str):
                _within(_format_size(budget, left, right if isinstance(right, tuple) else (right,)))
            return budget.checked(super().call_binop(context, operator, left, right))

    return BoundedEnvironment


@functools.cache
def _environment():
    import jinja2
    import jinja2.ext

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = _environment_class()(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.filters = {name: _bounded_filter(name, function) for name, function in env.filters.items()}
    env.filters.update(_INTERNAL_FILTERS)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    env.globals.pop("lipsum", None)  # random paragraphs, as many as asked for: nothing a prompt needs
    return env


def _describe(error: Exception) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


# Rendering a conversation's turns renders its prefixes (`render`), and a preference pair's two replies share
# their prompt: the texts of the last few conversations rendered are kept, so that each distinct prefix renders
# once (a DPO pair: 4 renders instead of 8). Conversations of over a million characters are not kept.
RECENT_RENDERS = 8
RECENT_RENDER_CHARS = 2**20


def _render_key(conversation: Conversation, add_generation_prompt: bool) -> str | None:
    """What a render's text depends on, as one string (None when the conversation holds values JSON does not
    write, which are then rendered every time)."""
    try:
        return json.dumps([conversation.messages, conversation.tools, conversation.documents, add_generation_prompt],
                          ensure_ascii=False)
    except (TypeError, ValueError):
        return None


class JinjaChatTemplate:
    def __init__(self, source: str, *, origin: str = "<string>"):
        import jinja2

        self.source, self.origin = source, origin
        self._recent: collections.OrderedDict[str, str] = collections.OrderedDict()  # guarded by _recent_lock
        self._recent_lock = threading.Lock()
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ChatTemplateError(f"chat template {origin}: syntax error on line {e.lineno}: {e.message}") from None
        except Exception as e:  # what jinja's parser or Python's compiler hit: too deep, too many nested loops
            raise ChatTemplateError(f"chat template {origin} cannot be compiled: {_describe(e)}") from None

    def render_text(self, conversation: Conversation, *, add_generation_prompt: bool = False) -> str:
        """The template's text for `conversation`, within the limits above; any failure is one ChatTemplateError
        naming the template and the cause (the limit, the template's `raise_exception`, or Python's error)."""
        import jinja2

        key = _render_key(conversation, add_generation_prompt)
        with self._recent_lock:
            if key in self._recent:
                self._recent.move_to_end(key)
                return self._recent[key]
        try:
            text = self._render(conversation, add_generation_prompt)
        except _LimitExceeded as e:
            raise ChatTemplateError(f"chat template {self.origin} exceeds a limit: {e}") from None
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"chat template {self.origin} failed: {e}") from None
        except Exception as e:  # the template's own arithmetic, types, recursion or memory
            raise ChatTemplateError(f"chat template {self.origin} failed: {_describe(e)}") from None
        if key is not None and len(key) + len(text) <= RECENT_RENDER_CHARS:
            with self._recent_lock:
                self._recent[key] = text
                if len(self._recent) > RECENT_RENDERS:
                    self._recent.popitem(last=False)
        return text

    def _render(self, conversation: Conversation, add_generation_prompt: bool) -> str:
        token = _BUDGET.set(_Budget((conversation.messages, conversation.tools, conversation.documents)))
        try:
            return self._template.render(messages=conversation.messages, tools=conversation.tools,
                                         documents=conversation.documents, add_generation_prompt=add_generation_prompt)
        finally:
            _BUDGET.reset(token)

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
