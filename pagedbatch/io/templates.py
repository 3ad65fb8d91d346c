"""Prompt templates: a Jinja2 template over a record's fields makes its prompt.

``PromptTemplate("Summarise:\\n{{ article }}").render(record) -> str``. The
environment is sandboxed (a template cannot reach Python internals) and
strict: a field the template uses that the record lacks, or holds null,
raises ``TemplateFieldError`` naming the field (``article``, ``meta.title``,
``turns[2]``), which the job turns into an error row. Optional fields are
written ``{{ x | default('') }}`` or ``{% if x is defined %}``.

Values print as a prompt wants them: strings as they are, numbers as Python
writes them, booleans as ``true``/``false``, lists and structs (Parquet
structs come as dicts) as JSON. ``meta.items`` is the field ``items`` of a
struct, not the dict method.
"""
from __future__ import annotations

import json
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment


class TemplateFieldError(ValueError):
    """A record cannot fill the template (a missing or null field, a failing expression)."""


class PromptTemplate:
    """A compiled template. ``option`` names where it came from in the
    ValueError a template that does not parse raises."""

    def __init__(self, source: str, option: str = "prompt_template"):
        if not isinstance(source, str) or not source.strip():
            raise ValueError(f"{option}: the template is empty")
        try:
            self._template = _ENV.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ValueError(f"{option}: the Jinja2 template does not parse: line {e.lineno}: {e.message}") from None
        self.source = source

    def render(self, record: dict[str, Any]) -> str:
        """The prompt for one record; TemplateFieldError when it cannot be made."""
        context = {name: _wrap(value, name) for name, value in record.items()}
        try:
            return self._template.render(context)
        except jinja2.UndefinedError as e:
            raise TemplateFieldError(str(e)) from None
        except jinja2.TemplateError as e:  # a sandbox violation, a filter's own error
            raise TemplateFieldError(f"{type(e).__name__}: {e}") from None
        except (TypeError, ValueError, ArithmeticError, LookupError) as e:  # e.g. {{ n + "x" }} on this row
            raise TemplateFieldError(f"{type(e).__name__}: {e}") from None


class _MissingField(jinja2.StrictUndefined):
    """Fails on any use but ``is defined`` / ``default``, naming the field."""

    __slots__ = ()

    @property
    def _undefined_message(self) -> str:
        if self._undefined_hint:
            return self._undefined_hint
        if self._undefined_obj is jinja2.utils.missing:
            return f"field {self._undefined_name!r} is missing from the record"
        return f"{type(self._undefined_obj).__name__} value has no attribute {self._undefined_name!r}"


class _Struct(dict):
    """A struct (dict) field that knows its path, for messages."""

    __slots__ = ("_pb_path",)


class _List(list):
    __slots__ = ("_pb_path",)

    def __iter__(self):
        for i, value in enumerate(list.__iter__(self)):
            yield _wrap(value, f"{self._pb_path}[{i}]")


def _wrap(value: Any, path: str) -> Any:
    if value is None:
        return _MissingField(hint=f"field {path!r} is null")
    if isinstance(value, dict) and not isinstance(value, _Struct):
        wrapped: Any = _Struct(value)
    elif isinstance(value, (list, tuple)) and not isinstance(value, _List):
        wrapped = _List(value)
    else:
        return value
    wrapped._pb_path = path
    return wrapped


class _Environment(ImmutableSandboxedEnvironment):
    # Fields reached through a struct or list are wrapped too, so that a missing
    # or null one names its whole path.

    def getattr(self, obj, attribute):
        if isinstance(obj, _Struct):  # the record's field wins over a dict method of that name
            return self._child(obj, attribute, obj[attribute] if attribute in obj else None, attribute in obj)
        return super().getattr(obj, attribute)

    def getitem(self, obj, argument):
        if isinstance(obj, _Struct):
            return self._child(obj, argument, obj.get(argument), argument in obj)
        value = super().getitem(obj, argument)
        if isinstance(obj, _List):
            return self._child(obj, argument, value, not isinstance(value, jinja2.Undefined))
        return value

    @staticmethod
    def _child(obj, key, value, present: bool):
        where = f"{obj._pb_path}[{key!r}]" if isinstance(obj, _List) or not isinstance(key, str) \
            else f"{obj._pb_path}.{key}"
        if not present:
            return _MissingField(hint=f"field {where!r} is missing from the record", obj=obj, name=key)
        return _wrap(value, where)


def _finalize(value: Any) -> Any:
    # What {{ ... }} prints; missing and null fields have already raised.
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, ensure_ascii=False, default=str)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value


_ENV = _Environment(undefined=_MissingField, autoescape=False, keep_trailing_newline=True, finalize=_finalize)

__all__ = ["PromptTemplate", "TemplateFieldError"]
