"""Prompt templates: a Jinja2 template over a record's fields makes its prompt.

``PromptTemplate("Summarise:\\n{{ article }}").render(record) -> str``. The
environment is sandboxed (a template cannot reach Python internals) and
strict: a field the template uses that the record lacks, or holds null,
raises ``TemplateFieldError`` naming the field (``article``, ``meta.title``,
``turns[2]``), which the job turns into an error row. Optional fields are
written ``{{ x | default('') }}`` or ``{% if x is defined %}``. ``record`` is
the whole record, for columns whose names are not identifiers
(``record['first name']``), unless a column is named ``record``.

Values print as a prompt wants them: strings as they are, numbers as Python
writes them, booleans as ``true``/``false``, lists and structs (Parquet
structs come as dicts) as JSON, a null inside them as ``null``.
``meta.items`` is the field ``items`` of a struct, not the dict method, and
``meta.title`` of a string is a missing field, not the str method (a method
still works when called: ``{{ name.upper() }}``).
"""
from __future__ import annotations

import json
import re
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
        context.setdefault(RECORD, _wrap(record, ""))
        try:
            return self._template.render(context)
        except jinja2.UndefinedError as e:
            raise TemplateFieldError(_with_column_hint(str(e), record)) from None
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


class _NullField(_MissingField):
    """A field that holds null: missing where it is used, ``null`` inside a printed list or struct."""

    __slots__ = ()


class _Method(_MissingField):
    """A method reached as a field (``{{ meta.title }}`` of a string): missing where it
    is used as a value, the method where it is called."""

    __slots__ = ("_pb_method",)

    def __init__(self, method, hint: str):
        super().__init__(hint=hint)
        self._pb_method = method


# The variable that holds the whole record: columns that are not identifiers
# (``first name``, ``my-field``) or are Jinja words (``in``) cannot be written bare.
RECORD = "record"


class _Struct(dict):
    """A struct (dict) field that knows its path, for messages ("" for the record itself)."""

    __slots__ = ("_pb_path",)


class _List(list):
    __slots__ = ("_pb_path",)

    # Every way a template reads elements wraps them, so a null one is null
    # wherever it is used (reversed: ``| last``; slices bypass env.getitem).
    def __iter__(self):
        for i, value in enumerate(list.__iter__(self)):
            yield _wrap(value, f"{self._pb_path}[{i}]")

    def __reversed__(self):
        for i in range(len(self) - 1, -1, -1):
            yield _wrap(list.__getitem__(self, i), f"{self._pb_path}[{i}]")

    def __getitem__(self, key):
        value = list.__getitem__(self, key)
        if isinstance(key, slice):
            bounds = ":".join("" if v is None else str(v) for v in (key.start, key.stop, key.step))
            return _wrap(value, f"{self._pb_path}[{bounds[:-1] if key.step is None else bounds}]")
        return value


class _Text(str):
    """A string field that knows its path, for messages. (str takes no __slots__.)"""


def _wrap(value: Any, path: str) -> Any:
    if value is None:
        return _NullField(hint=f"field {path!r} is null")
    if isinstance(value, dict) and not isinstance(value, _Struct):
        wrapped: Any = _Struct(value)
    elif isinstance(value, (list, tuple)) and not isinstance(value, _List):
        wrapped = _List(value)
    elif type(value) is str:
        wrapped = _Text(value)
    else:
        return value
    wrapped._pb_path = path
    return wrapped


def _child_path(parent: str, key: Any) -> str:
    if not parent:  # a column of the record: named as it is
        return str(key)
    if isinstance(key, str) and key.isidentifier():
        return f"{parent}.{key}"
    return f"{parent}[{key!r}]"


class _Environment(ImmutableSandboxedEnvironment):
    # Fields reached through a struct or list are wrapped too, so that a missing
    # or null one names its whole path.

    def getattr(self, obj, attribute):
        if isinstance(obj, _Struct):  # the record's field wins over a dict method of that name
            return self._child(obj, attribute, obj[attribute] if attribute in obj else None, attribute in obj)
        return self._not_a_field(obj, attribute, super().getattr(obj, attribute))

    def getitem(self, obj, argument):
        if isinstance(obj, _Struct):
            return self._child(obj, argument, obj.get(argument), argument in obj)
        # The sandbox falls back to attributes: meta['title'] of a string is its method too.
        value = self._not_a_field(obj, argument, super().getitem(obj, argument))
        if isinstance(obj, _List) and not isinstance(value, jinja2.Undefined):
            return self._child(obj, argument, value, True)
        return value

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's own signature)
        if isinstance(__obj, _Method):  # called, it is the method (the sandbox's checks still apply)
            __obj = __obj._pb_method
        return super().call(__context, __obj, *args, **kwargs)

    @staticmethod
    def _not_a_field(obj, name, value):
        # A value that is not a struct has no fields: what Python finds on it is a
        # method (printed, a "<built-in method ...>" repr) or nothing.
        path = getattr(obj, "_pb_path", None)
        if isinstance(value, jinja2.Undefined):
            if value._undefined_hint is None and path is not None:  # not a sandbox refusal
                return _MissingField(hint=_not_a_struct(path, name, obj), obj=obj, name=name)
            return value
        if callable(value) and isinstance(name, str):
            hint = _not_a_struct(path, name, obj) if path is not None else \
                f"{type(obj).__name__} value has no field {name!r}"
            return _Method(value, hint)
        return value

    @staticmethod
    def _child(obj, key, value, present: bool):
        where = _child_path(obj._pb_path, key)
        if not present:
            return _MissingField(hint=f"field {where!r} is missing from the record", obj=obj, name=key)
        return _wrap(value, where)


def _not_a_struct(path: str, name: Any, obj: Any) -> str:
    kind = "a string" if isinstance(obj, str) else "a list"
    return f"field {_child_path(path, name)!r} is missing from the record ({path} is {kind}, not a struct)"


def _with_column_hint(message: str, record: dict[str, Any]) -> str:
    # {{ my-field }} parses as my - field: name the column the user meant and how to write it.
    if RECORD in record:  # a column named record hides the variable
        return message
    for column in record:
        head = re.match(r"[^\W\d]\w*", column) if isinstance(column, str) and not column.isidentifier() else None
        if head and message == f"field {head.group()!r} is missing from the record":
            return (f"{message} (a column whose name is not an identifier is written "
                    f"{RECORD}[{column!r}])")
    return message


def _plain(value: Any) -> Any:
    # What JSON shows of a value: a null element is null; the raw containers are
    # read past the wrappers' element views.
    if isinstance(value, _NullField):
        return None
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in dict.items(value)}
    if isinstance(value, list):
        return [_plain(v) for v in list.__iter__(value)]
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def _finalize(value: Any) -> Any:
    # What {{ ... }} prints; missing and null fields have already raised.
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(_plain(value), ensure_ascii=False, default=str)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value


_ENV = _Environment(undefined=_MissingField, autoescape=False, keep_trailing_newline=True, finalize=_finalize)
_ENV.policies["json.dumps_function"] = lambda value, **kwargs: json.dumps(_plain(value), **kwargs)  # | tojson

__all__ = ["PromptTemplate", "TemplateFieldError"]
