"""Chat templates: Jinja code that ships inside a model file, rendered in a bounded sandbox.

A chat template comes from the model file (GGUF `tokenizer.chat_template`, tokenizer_config.json,
chat_template.jinja), so it is untrusted code. It runs in Jinja's `ImmutableSandboxedEnvironment`
(no internals, no mutation of lists and dicts), as transformers does, and within limits:

- no loader: `{% include %}`, `{% import %}`, `{% from %}` and `{% extends %}` are refused;
- `range()` holds at most MAX_RANGE items, and `lipsum` is gone;
- every loop item, call, filter and intercepted operator (`* ** + %`) is one step of a per-render
  budget (MAX_STEPS), and each step checks the CPU time the render has used (MAX_SECONDS);
- a string or list made by an operator, `~`, a filter or a method is refused past MAX_VALUE
  characters or items, up front where its size is known before it is built (`'a' * n`,
  `replace`, `join`, `%` and `format` widths); an int past MAX_INT_BITS bits;
- all the text a template writes, in macros and blocks too, counts against MAX_EMITTED
  characters, and the prompt itself (read through `generate()`) stops past MAX_OUTPUT;
- RecursionError, MemoryError and any other exception become one line.

Loops, concatenation and output are instrumented by rewriting the parsed template before it
is compiled: a `for` iterates through a step-charging generator, `a ~ b` and each output node
go through checks. Every failure is a `TemplateError` (an `InputError`: a 400 from the server,
one line and exit 2 from the CLI); a template that does not parse is a `ModelFormatError`.
"""

from __future__ import annotations

import contextvars
import functools
import json
import re
import string
import time
from datetime import datetime

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.runtime import LoopContext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.visitor import NodeTransformer

from isthmus.compiler.frontends.files import one_line
from isthmus.errors import IsthmusError, ModelFormatError, TemplateError

MAX_RANGE = 10_000          # items of one range()
MAX_STEPS = 1_000_000       # loop items + calls + filters + operators, per render
MAX_SECONDS = 1.0           # CPU time of the rendering thread, per render: what the template itself burns, so
                            # a loaded or paused machine (other threads holding the GIL, a stopped process)
                            # cannot turn an ordinary template's 0.1 s into a refusal
MAX_VALUE = 4 << 20         # characters of one string, items of one list
MAX_OUTPUT = 4 << 20        # characters of the rendered prompt
MAX_EMITTED = 4 * MAX_OUTPUT  # characters written by all output nodes (macro bodies and blocks too)
MAX_INT_BITS = 1 << 16

_BUDGET: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("isthmus_template_budget", default=None)


class _Budget:
    """What one render has spent; a check raises TemplateError once a limit is passed."""

    def __init__(self):
        self.steps = self.emitted = 0
        self.deadline = time.thread_time() + MAX_SECONDS
        # reading the thread's CPU clock is a system call (~0.4 us, 10x the wall clock): a thread's
        # CPU time never runs ahead of the wall clock, so it is read only once the wall clock shows
        # that the budget left could be spent
        self.wall_check = time.monotonic() + MAX_SECONDS

    def step(self) -> None:
        self.steps += 1
        if self.steps > MAX_STEPS:
            raise TemplateError(f"the chat template ran past its budget of {MAX_STEPS} steps "
                                f"(loop items, calls and operations)")
        if time.monotonic() > self.wall_check:
            left = self.deadline - time.thread_time()
            if left <= 0:
                raise TemplateError(f"the chat template ran past its time limit of {MAX_SECONDS:g} s of CPU")
            self.wall_check = time.monotonic() + left

    def emit(self, n: int) -> None:
        self.emitted += n
        if self.emitted > MAX_EMITTED:
            raise TemplateError(f"the chat template wrote over {MAX_EMITTED} characters")


def _step() -> None:
    budget = _BUDGET.get()
    if budget is not None:   # None while Jinja folds constants at compile time
        budget.step()


def render(template: str, messages: list[dict], add_generation_prompt: bool = True,
           bos_token: str = "", eos_token: str = "", **kwargs) -> str:
    """Render a Hugging Face chat template as transformers' `apply_chat_template` does, within the limits."""
    compiled = _compile(template)
    # transformers passes these as None, and templates test `tools is not none`.
    kwargs.setdefault("tools", None)
    kwargs.setdefault("documents", None)
    token = _BUDGET.set(budget := _Budget())
    pieces, size = [], 0
    stream = None
    try:
        stream = compiled.generate(messages=messages, add_generation_prompt=add_generation_prompt,
                                   bos_token=bos_token, eos_token=eos_token, **kwargs)
        for piece in stream:
            size += len(piece)
            if size > MAX_OUTPUT:
                raise TemplateError(f"the chat template's output passed {MAX_OUTPUT} characters")
            pieces.append(piece)
            budget.step()
    except IsthmusError:
        raise
    except jinja2.exceptions.SecurityError as e:
        raise TemplateError(f"the chat template did something the sandbox forbids: {_said(e)}") from None
    except jinja2.TemplateError as e:   # raise_exception(...) and undefined names included
        raise TemplateError(f"the chat template rejected the conversation: {_said(e)}") from None
    except RecursionError:
        raise TemplateError("the chat template recursed too deeply") from None
    except MemoryError:
        raise TemplateError("the chat template ran out of memory") from None
    except Exception as e:   # a template bug or a hostile template: TypeError, OverflowError, ...
        raise TemplateError(f"the chat template failed on this conversation: {type(e).__name__}: {_said(e)}") from None
    finally:
        _BUDGET.reset(token)
        if stream is not None:
            stream.close()
    return "".join(pieces)


def _said(e: Exception) -> str:
    return one_line(str(getattr(e, "message", None) or e))[:300]


# --- checks on sizes known before a value is built --------------------------------------------

def _too_big(what: str, n: int) -> TemplateError:
    unit = "characters" if what in ("a str", "a string") else "items" if what.startswith("a ") else ""
    return TemplateError(f"the chat template would build {what} of {n} {unit}".rstrip()
                         + f"; the limit is {MAX_VALUE}")


def _check_size(value):
    if isinstance(value, (str, list, tuple, dict, set, frozenset, bytes)) and len(value) > MAX_VALUE:
        raise _too_big(f"a {type(value).__name__}", len(value))
    if type(value) is int and value.bit_length() > MAX_INT_BITS:
        raise TemplateError(f"the chat template built an integer of {value.bit_length()} bits; "
                            f"the limit is {MAX_INT_BITS}")
    return value


def _check_width(n, what: str = "text with a width") -> None:
    if type(n) is int and n > MAX_VALUE:
        raise _too_big(what, n)


def _ints(values) -> list[int]:
    return [v for v in values if type(v) is int]


def _check_replace(s, old, new, count=-1) -> None:
    if not (isinstance(s, (str, bytes)) and type(old) is type(s) and type(new) is type(s)):
        s, old, new = str(s), str(old), str(new)
    n = s.count(old) if old else len(s) + 1
    if type(count) is int and count >= 0:
        n = min(n, count)
    if len(s) + n * (len(new) - len(old)) > MAX_VALUE:
        raise _too_big("a string", len(s) + n * (len(new) - len(old)))


def _check_join(sep, items: list) -> None:
    n = len(str(sep)) * max(len(items) - 1, 0)
    for x in items:
        n += len(x) if isinstance(x, str) else len(str(x))
        if n > MAX_VALUE:
            raise _too_big("a string", n)


_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")


def _check_percent(fmt: str, args) -> None:
    """`fmt % args`: widths and precisions are bounded, written (`%9999d`) or passed (`%*d`)."""
    values = args if isinstance(args, tuple) else tuple(args.values()) if isinstance(args, dict) else (args,)
    for width, precision in _PERCENT_SPEC.findall(fmt):
        for n in (width, precision):
            if n == "*":
                for v in _ints(values):
                    _check_width(v)
            elif n:
                _check_width(int(n))


def _check_format(fmt: str, args, kwargs) -> None:
    """`fmt.format(...)`: widths in the replacement fields are bounded, nested ones included."""
    try:
        fields = list(string.Formatter().parse(fmt))
    except ValueError:
        return   # the call itself raises
    for _, _, spec, _ in fields:
        if not spec:
            continue
        if "{" in spec:
            for v in _ints([*args, *kwargs.values()]):
                _check_width(v)
        for n in re.findall(r"\d+", spec):
            _check_width(int(n))


def _check_method(method, args, kwargs):
    """Checks for the str methods whose result size depends on an argument; may return new args."""
    inner = getattr(method, "__wrapped__", method)   # the sandbox wraps str.format
    owner, name = getattr(inner, "__self__", None), getattr(inner, "__name__", "")
    if not isinstance(owner, (str, bytes)):
        return args
    if name in ("center", "ljust", "rjust", "zfill"):
        for v in _ints([*args, *kwargs.values()]):
            _check_width(v)
    elif name == "expandtabs":
        size = _ints([*args, *kwargs.values(), 8])[0]
        _check_width(len(owner) + owner.count("\t" if isinstance(owner, str) else b"\t") * size, "a string")
    elif name == "replace":
        _check_replace(owner, *args, **kwargs)
    elif name == "join" and args:
        items = list(args[0])
        _check_join(owner, items)
        return (items, *args[1:])
    elif name == "format":
        _check_format(owner, args, kwargs)
    elif name == "format_map" and args and isinstance(args[0], dict):
        _check_format(owner, (), args[0])
    return args


# Filters whose output size an argument decides; each gets the filter's own arguments (after
# Jinja's context/environment argument) and may return new ones.
def _filter_replace(s, old, new, count=None, *rest):
    _check_replace(s, old, new, -1 if count is None else count)


def _filter_join(value, d="", attribute=None, *rest):
    items = list(value)
    if attribute is None:
        _check_join(d, items)
    return (items, d, attribute, *rest)


def _filter_format(value, *args, **kwargs):
    _check_percent(str(value), kwargs or args)


def _filter_indent(s, width=4, *rest, **kwargs):
    width = kwargs.get("width", width)
    w = width if type(width) is int else len(str(width))
    s = str(s)
    _check_width(len(s) + (s.count("\n") + 1) * w, "a string")


def _filter_wordwrap(s, width=79, break_long_words=True, wrapstring=None, *rest, **kwargs):
    wrap = kwargs.get("wrapstring", wrapstring)
    width = kwargs.get("width", width)
    s = str(s)
    if type(width) is int and width > 0:
        lines = len(s) // width + s.count("\n") + 1
        _check_width(len(s) + lines * len(str(wrap or "\n")), "a string")


def _filter_sum(iterable, attribute=None, start=0, *rest, **kwargs):
    start = kwargs.get("start", start)
    if not isinstance(start, (int, float)):   # sum(lists, start=[]) copies quadratically
        raise TemplateError("the chat template's sum filter may only add numbers")


_SIZED_FILTERS = {"center", "batch", "slice", "indent", "wordwrap", "truncate"}   # int arguments bounded
_FILTER_CHECKS = {"replace": _filter_replace, "join": _filter_join, "format": _filter_format,
                  "indent": _filter_indent, "wordwrap": _filter_wordwrap, "sum": _filter_sum}


def _bounded_filter(name: str, f):
    check = _FILTER_CHECKS.get(name)
    skip = 1 if getattr(f, "jinja_pass_arg", None) is not None else 0   # context/eval_context/environment

    @functools.wraps(f)
    def bounded(*args, **kwargs):
        _step()
        own = args[skip:]
        if name in _SIZED_FILTERS:
            for v in _ints([*own[1:], *kwargs.values()]):
                _check_width(v, "output sized by an argument")
        if check is not None:
            new = check(*own, **kwargs)
            if new is not None:
                args = (*args[:skip], *new)
        return _check_size(f(*args, **kwargs))
    return bounded


# --- the environment ---------------------------------------------------------------------------

def _range(*args):
    r = range(*args)
    n = max(0, (r.stop - r.start + r.step - (1 if r.step > 0 else -1)) // r.step)   # len() overflows past 2**63
    if n > MAX_RANGE:
        raise TemplateError(f"the chat template asked for range({', '.join(map(str, args))}), {n} items; "
                            f"the limit is {MAX_RANGE}")
    return r


def _iterate(iterable):
    budget = _BUDGET.get()
    for item in iterable:
        if budget is not None:
            budget.step()
        yield item


@jinja2.pass_context
def _loop_iter(context, iterable):
    return _iterate(iterable)


@jinja2.pass_context
def _concat(context, parts):
    texts = [str(p) for p in parts]
    n = sum(map(len, texts))
    if n > MAX_VALUE:
        raise _too_big("a string", n)
    return "".join(texts)


@jinja2.pass_context
def _emit(context, value):
    text = str(value)
    budget = _BUDGET.get()
    if budget is not None:
        budget.emit(len(text))
    return text


def _filter(node, name: str, lineno: int):
    return nodes.Filter(node, name, [], [], None, None, lineno=lineno)


class _Instrument(NodeTransformer):
    """Rewrites a parsed template so loops, `~` and output go through the budget."""

    def visit_For(self, node):
        node = self.generic_visit(node)
        node.iter = _filter(node.iter, "_isthmus_loop", node.lineno)
        return node

    def visit_Concat(self, node):
        node = self.generic_visit(node)
        return _filter(nodes.List(node.nodes, lineno=node.lineno), "_isthmus_concat", node.lineno)

    def visit_Output(self, node):
        node = self.generic_visit(node)
        node.nodes = [_filter(child, "_isthmus_emit", node.lineno) for child in node.nodes]
        return node

    def _refuse(self, node):
        tag = {"Include": "include", "Import": "import", "FromImport": "from ... import", "Extends": "extends"}
        raise TemplateError(f"the model's chat template uses {{% {tag[type(node).__name__]} %}} (line {node.lineno}); "
                            f"chat templates may not load other templates")

    visit_Include = visit_Import = visit_FromImport = visit_Extends = _refuse


_JINJA_KWARGS = ("_loop_vars", "_block_vars", "caller")   # what the compiled template adds to a call


class _Sandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def call(__self, __context, __obj, *args, **kwargs):
        _step()
        if isinstance(__obj, LoopContext) and args:   # `loop(children)` in a recursive for
            args = (_iterate(args[0]), *args[1:])
        args = _check_method(__obj, args, {k: v for k, v in kwargs.items() if k not in _JINJA_KWARGS})
        return _check_size(super().call(__context, __obj, *args, **kwargs))

    def call_binop(self, context, operator, left, right):
        _step()
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, bytes, list, tuple)) and type(n) is int:
                    if len(seq) * n > MAX_VALUE:
                        raise _too_big(f"a {type(seq).__name__}", len(seq) * n)
            if type(left) is int and type(right) is int and left.bit_length() + right.bit_length() > MAX_INT_BITS:
                raise TemplateError(f"the chat template would build an integer of over {MAX_INT_BITS} bits")
        elif operator == "**":
            if type(left) is int and type(right) is int and right > 0 and abs(left) > 1 \
                    and (abs(left).bit_length() - 1) * right > MAX_INT_BITS:
                raise TemplateError(f"the chat template would build an integer of over {MAX_INT_BITS} bits")
        elif operator == "+":
            if isinstance(left, (str, bytes, list, tuple)) and isinstance(right, (str, bytes, list, tuple)) \
                    and len(left) + len(right) > MAX_VALUE:
                raise _too_big(f"a {type(left).__name__}", len(left) + len(right))
        elif operator == "%" and isinstance(left, (str, bytes)):
            _check_percent(left if isinstance(left, str) else left.decode("latin-1"), right)
        return _check_size(self.binop_table[operator](left, right))


class _Generation(Extension):
    # `{% generation %}` marks assistant text for training masks; rendering just keeps it.
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_keep"), [], [], body).set_lineno(lineno)

    def _keep(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML characters, which would change the prompt.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=1)
def _environment() -> _Sandbox:
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, loopcontrols])
    env.filters["tojson"] = _tojson
    env.filters = {name: _bounded_filter(name, f) for name, f in env.filters.items()}
    env.filters.update(_isthmus_loop=_loop_iter, _isthmus_concat=_concat, _isthmus_emit=_emit)
    env.globals.pop("lipsum", None)
    env.globals.update(range=_range, raise_exception=_raise_exception,
                       strftime_now=lambda fmt: datetime.now().strftime(str(fmt)[:100]))
    return env


@functools.lru_cache(maxsize=8)
def _compile(template: str):
    env = _environment()
    try:
        tree = env.parse(template)
    except jinja2.TemplateError as e:
        line = f" (line {e.lineno})" if getattr(e, "lineno", None) else ""
        raise ModelFormatError(f"the model's chat template does not parse: {_said(e)}{line}") from None
    except RecursionError:
        raise ModelFormatError("the model's chat template does not parse: it nests too deeply") from None
    try:
        return env.from_string(_Instrument().visit(tree))
    except RecursionError:
        raise ModelFormatError("the model's chat template does not compile: it nests too deeply") from None
    except jinja2.TemplateError as e:
        raise ModelFormatError(f"the model's chat template does not compile: {_said(e)}") from None
