"""Rule templates: Jinja2 in an immutable sandbox, with a budget.

A template is written by a project's maintainer and rendered with a delivery's payload on the
server, so it is untrusted code in two ways:

- **It must not change what it reads.** `ImmutableSandboxedEnvironment` refuses the methods that
  change lists, dicts and sets (`payload.comment.update(...)` would otherwise rewrite the payload
  that rules of other projects see next).
- **It must not take the server's time or memory.** The sandbox guards attribute access, not
  work. Each render gets 100 ms of CPU (its thread's) and 100,000 loop iterations in all; every
  loop, call, operator and output chunk checks them. No value it builds may exceed a million
  characters: `*`, `+`, `~`, `%`, `str.format` and every filter and method are checked before they
  allocate (widths, counts, repeats) and after. Over budget, the render fails with a
  `SecurityError` (a `TemplateError`) that the event records against the rule.

Loops and `~` are reached through the compiled template's own `environment` (an internal name a
template cannot rebind), so `{% set range = ... %}` and the like cannot step around them.
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from typing import Any

from jinja2 import StrictUndefined, TemplateError, nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

#: CPU seconds one render may use
CPU_BUDGET_S = 0.1
#: loop iterations one render may make, all loops together
LOOP_BUDGET = 100_000
#: the largest string, list or number a template may build
VALUE_MAX = 1_000_000
#: `range()` in a template
RANGE_MAX = 10_000
#: a width or precision in a format string that would build a huge value
_BIG_WIDTH = re.compile(r"(%[#0 +\-]*(\*|\d{7,}|\.\d{7,}|\.\*))|(\{[^{}]*:[^{}]*(\d{7,}|\{))")


class Budget:
    def __init__(self) -> None:
        self.deadline = time.thread_time() + CPU_BUDGET_S
        self.iterations = 0

    def tick(self) -> None:
        if time.thread_time() > self.deadline:
            raise SecurityError(f"the template took more than {int(CPU_BUDGET_S * 1000)} ms")

    def loop(self) -> None:
        self.iterations += 1
        if self.iterations > LOOP_BUDGET:
            raise SecurityError(f"the template's loops ran more than {LOOP_BUDGET:,} times")
        if not self.iterations & 63:
            self.tick()


_budget: ContextVar[Budget | None] = ContextVar("sb_template_budget", default=None)


def _tick() -> None:
    budget = _budget.get()
    if budget is not None:
        budget.tick()


def _size(value: Any) -> int:
    return len(value) if isinstance(value, str | bytes | list | tuple | dict) else 0


def _check_size(value: Any) -> Any:
    if _size(value) > VALUE_MAX or (isinstance(value, int) and abs(value) > 10**VALUE_DIGITS):
        raise SecurityError("the template built a value that is too large")
    return value


#: the largest integer a template may build has this many digits
VALUE_DIGITS = 100


def _check_args(args: Iterable[Any]) -> None:
    """Arguments that ask for a huge result: a count or width over the limit, a format string
    with a huge width."""
    for arg in args:
        if isinstance(arg, int) and not isinstance(arg, bool) and abs(arg) > VALUE_MAX:
            raise SecurityError("a number in the template is too large for this call")
        if _size(arg) > VALUE_MAX:
            raise SecurityError("a value in the template is too large for this call")


def _check_format(fmt: Any) -> None:
    if isinstance(fmt, str) and _BIG_WIDTH.search(fmt):
        raise SecurityError("a format width or precision in the template is too large")


def _check_replace(subject: Any, args: tuple[Any, ...]) -> None:
    """`s.replace(old, new)` grows `s` by each occurrence: bound it before it happens."""
    if not isinstance(subject, str) or len(args) < 2:
        return
    old, new = args[0], args[1]
    if not isinstance(old, str) or not isinstance(new, str):
        return
    count = subject.count(old) if old else len(subject) + 1
    if len(args) > 2 and isinstance(args[2], int) and args[2] >= 0:
        count = min(count, args[2])
    if len(subject) + count * max(0, len(new) - len(old)) > VALUE_MAX:
        raise SecurityError("the template's replace would build a value that is too large")


def _guarded_filter(func: Callable[..., Any], name: str) -> Callable[..., Any]:
    # a filter marked pass_context / pass_eval_context / pass_environment gets that first
    skip = 1 if getattr(func, "jinja_pass_arg", None) is not None else 0

    @functools.wraps(func)  # keeps `jinja_pass_arg`
    def guarded(*args: Any, **kwargs: Any) -> Any:
        _tick()
        values = args[skip:]
        _check_args([*values[1:], *kwargs.values()])
        if name == "format" and values:
            _check_format(values[0])
        if name == "replace" and values:
            _check_replace(str(values[0]), tuple(values[1:]))
        return _check_size(func(*args, **kwargs))

    return guarded


def _bounded_range(*args: int) -> range:
    _check_args(args)
    r = range(*args)
    if len(r) > RANGE_MAX:
        raise SecurityError(f"range() in a template is limited to {RANGE_MAX:,} items")
    return r


def _internal(name: str) -> nodes.InternalName:
    """A name of the compiled code itself, which a template cannot see or rebind."""
    node = object.__new__(nodes.InternalName)
    nodes.Node.__init__(node, name)
    return node


def _through(method: str, arg: nodes.Expr, lineno: int) -> nodes.Call:
    """`environment.<method>(arg)` in the compiled template."""
    call = nodes.Call(
        nodes.Getattr(_internal("environment"), method, "load"), [arg], [], None, None
    )
    return call.set_lineno(lineno)


class _Sandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.globals["range"] = _bounded_range
        self.filters = {name: _guarded_filter(f, name) for name, f in self.filters.items()}

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        """Every loop counts against the budget, every `~` is sized."""
        tree = super()._parse(source, name, filename)
        for loop in list(tree.find_all(nodes.For)):
            loop.iter = _through("sb_loop", loop.iter, loop.lineno)
        for concat in list(tree.find_all(nodes.Concat)):
            joined = _through(
                "sb_concat", nodes.List(list(concat.nodes)).set_lineno(concat.lineno), concat.lineno
            )
            concat.nodes = [joined]  # a one-part concatenation of the checked join
        return tree

    def sb_loop(self, iterable: Any) -> Iterator[Any]:
        budget = _budget.get()
        for item in iterable:
            if budget is not None:
                budget.loop()
            yield item

    def sb_concat(self, parts: list[Any]) -> str:
        _tick()
        texts = [str(self.finalize(p)) if self.finalize else str(p) for p in parts]  # type: ignore[misc]
        if sum(len(t) for t in texts) > VALUE_MAX:
            raise SecurityError("the template built a value that is too large")
        return "".join(texts)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _tick()
        if operator == "**" and isinstance(right, int | float) and abs(right) > 100:
            raise SecurityError("exponent too large in a template")
        if operator == "*":
            sizes = [_size(v) or 1 for v in (left, right)]
            counts = [abs(int(v)) if isinstance(v, int) else 1 for v in (left, right)]
            if max(sizes) * max(counts) > VALUE_MAX:
                raise SecurityError("result too large in a template")
        if operator == "+" and _size(left) + _size(right) > VALUE_MAX:
            raise SecurityError("result too large in a template")
        if operator == "%":
            _check_format(left)
        return _check_size(super().call_binop(context, operator, left, right))

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        _tick()
        _check_args([*args, *kwargs.values()])
        inner = getattr(__obj, "__wrapped__", __obj)  # the sandbox wraps str.format
        owner = getattr(inner, "__self__", None)
        if isinstance(owner, str):
            method = getattr(inner, "__name__", "")
            if method in ("format", "format_map", "__mod__"):
                _check_format(owner)
            elif method == "replace":
                _check_replace(owner, args)
        return _check_size(super().call(__context, __obj, *args, **kwargs))

    def getattr(self, obj: Any, attribute: str) -> Any:
        _tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        _tick()
        return super().getitem(obj, argument)


env = _Sandbox(
    undefined=StrictUndefined,
    autoescape=False,
    finalize=lambda value: "" if value is None else value,
)


def render(source: str, context: dict[str, Any], limit: int) -> str:
    """`source` rendered within the budget, at most `limit` characters; raises `TemplateError`
    (`SecurityError` when over budget)."""
    token = _budget.set(Budget())
    try:
        out: list[str] = []
        size = 0
        for chunk in env.from_string(source).generate(context):
            size += len(chunk)
            if size > limit:
                raise SecurityError(f"the template rendered more than {limit:,} characters")
            _tick()
            out.append(chunk)
        return "".join(out)
    except TemplateError:
        raise
    except RecursionError:
        raise SecurityError("the template recursed too deeply") from None
    except MemoryError:
        raise SecurityError("the template built a value that is too large") from None
    except Exception as exc:  # a template's own error (1/0, a huge int's str): the rule's
        raise TemplateError(f"{type(exc).__name__}: {exc}") from None
    finally:
        _budget.reset(token)


def check(source: str, sample: dict[str, Any], limit: int) -> str | None:
    """Why a template cannot be saved, or None: it must parse, and rendering it against a
    sample payload must stay within the budget (fields the sample lacks are no reason)."""
    try:
        env.parse(source)
    except TemplateError as exc:
        return str(exc)
    try:
        render(source, sample, limit)
    except SecurityError as exc:
        return str(exc)
    except TemplateError:
        return None  # an undefined field of the sample, say: the real payload decides
    except Exception:
        return None
    return None
