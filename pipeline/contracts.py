"""Data contracts: marshmallow schemas registered by name and version.

A contract is checked on the producer's output and on the consumer's input at
every handoff. Payloads stay JSON: a contract checks a payload, it never turns
it into other Python objects, so what is sealed is exactly what was checked.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded
from marshmallow import RAISE, Schema, ValidationError, fields, validate
from marshmallow.decorators import VALIDATES, VALIDATES_SCHEMA

from .errors import ContractMismatch, ContractViolation, DefinitionError, UnknownContract
from .registry import Registry

__all__ = [
    "Contract",
    "ContractRegistry",
    "contract",
    "contracts",
    "flatten_errors",
    "printable",
    "compatibility_problems",
    "fan_in_schema",
]


@dataclass(frozen=True, slots=True)
class Contract:
    """One registered schema: ``name@version``."""

    name: str
    version: int
    schema: Schema

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def validate(
        self,
        payload: Any,
        *,
        side: str = "payload",
        agent: str = "",
        run_id: str = "",
        version: int | None = None,
    ) -> None:
        """Raise ``ContractViolation`` naming every failing field path, or return."""
        try:
            errors = self._errors(payload)
        except SoftTimeLimitExceeded:  # the step's time limit, not the payload's fault
            raise
        except RecursionError:
            errors = {"_schema": ["nested too deeply"]}
        except Exception as e:  # a semantic rule that crashed on this payload refuses it
            errors = {"_schema": [f"rule failed on this payload: {type(e).__name__}: {e}"]}
        if not errors:
            return
        flat = flatten_errors(errors)
        where = ", ".join(
            part
            for part in (
                f"run {run_id}" if run_id else "",
                f"version {version}" if version is not None else "",
                f"agent {agent}" if agent else "",
            )
            if part
        )
        details = "; ".join(f"{path}: {' '.join(msgs)}" for path, msgs in sorted(flat.items()))
        raise ContractViolation(
            f"{side} breaks contract {self.ref}"
            + (f" ({where})" if where else "")
            + f": {details}",
            contract=self.ref,
            side=side,
            agent=agent,
            run_id=run_id,
            version=version,
            errors=flat,
        )

    def _errors(self, payload: Any) -> dict[Any, Any]:
        if not isinstance(payload, Mapping):
            return {"_schema": [f"expected a JSON object, got {_json_type(payload)}"]}
        try:
            errors = dict(self.schema.validate(payload))
        except ValidationError as e:  # raised by a rule outside a field
            errors = e.normalized_messages()  # type: ignore[no-untyped-call]
        _merge(errors, _conversions(self.schema, payload))
        return errors

    def describe(self) -> dict[str, Any]:
        """The contract as JSON-friendly data (for ``pipeline contracts``): each field's type,
        ``required``, ``allow_none`` and ``validators``, and the schema's own rules
        (``schema_validators``: its ``@validates_schema`` methods)."""
        return {"contract": self.ref, "fields": _describe_fields(self.schema),
                "schema_validators": _schema_rules(self.schema)}


class ContractRegistry(Registry[Contract]):
    """Contracts by ``name@version``."""

    def __init__(self) -> None:
        super().__init__("contract", UnknownContract, order=lambda c: (c.name, c.version))

    def register(self, name: str, version: int, schema: type[Schema] | Schema) -> Contract:
        if "@" in name or not name:
            raise DefinitionError(f"contract name {name!r} must be non-empty and hold no '@'")
        instance = schema() if isinstance(schema, type) else schema
        c = Contract(name, int(version), instance)
        existing = self._find(c.ref)
        if existing is not None and type(existing.schema) is not type(instance):
            raise DefinitionError(f"contract {c.ref} is already registered with another schema")
        return self._put(c.ref, c)


contracts = ContractRegistry()
"""The process-wide registry that agents and workflows use."""


def contract(name: str, version: int = 1) -> Any:
    """Class decorator: register a marshmallow ``Schema`` as ``name@version``."""

    def register(schema: type[Schema]) -> type[Schema]:
        contracts.register(name, version, schema)
        return schema

    return register


def fan_in_schema(producers: Mapping[str, Schema]) -> Schema:
    """The schema of a fan-in input: agent name -> that agent's output."""
    return Schema.from_dict(
        {name: fields.Nested(type(s), required=True) for name, s in producers.items()},
        name="FanIn",
    )()


def flatten_errors(errors: Mapping[Any, Any], prefix: str = "") -> dict[str, list[str]]:
    """marshmallow's nested error dict as ``{"a.b.0.c": [messages]}``."""
    out: dict[str, list[str]] = {}
    for key, value in errors.items():
        if key == "_schema":
            path = prefix or "<root>"
        else:
            name = printable(str(key)) or '""'  # an empty key still gets a visible path
            path = f"{prefix}.{name}" if prefix else name
        if isinstance(value, Mapping):
            for sub, msgs in flatten_errors(value, path).items():
                out.setdefault(sub, []).extend(msgs)
        else:
            msgs = value if isinstance(value, list) else [value]
            out.setdefault(path, []).extend(printable(str(m)) for m in msgs)
    return out


def printable(text: str) -> str:
    """``text`` with line breaks and other unprintable characters escaped (``\\n``,
    ``\\x1c``, ``\\ud800``): a payload's keys cannot break an error onto several lines."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in text)


def _conversions(schema: Schema, payload: Any) -> dict[Any, Any]:
    """Errors for the values marshmallow accepts only by converting them.

    marshmallow reads ``"12"`` and ``2.5`` as the integer 12 and 2, ``"1e3"`` as a
    float, and ``"yes"`` or ``1`` as true. A contract checks a payload without
    converting it, so what would be sealed is the string or the float, and the next
    agent would compute with it: such values are refused with the field's own
    "invalid" message. Null is left to marshmallow (``allow_none``).
    """
    if not isinstance(payload, Mapping):
        return {}  # marshmallow names what is wrong with it
    errors: dict[Any, Any] = {}
    for name, field in schema.fields.items():
        key = field.data_key or name
        if not field.dump_only and key in payload:
            problem = _conversion(field, payload[key])
            if problem:
                errors[key] = problem
    return errors


def _conversion(field: fields.Field[Any], value: Any) -> Any:
    if value is None:
        return None
    if isinstance(field, fields.Nested) and isinstance(field.schema, Schema):
        schema = field.schema
        if field.many:
            return _each(value, lambda item: _conversions(schema, item))
        return _conversions(schema, value)
    if isinstance(field, fields.List):
        inner = field.inner
        return _each(value, lambda item: _conversion(inner, item))
    if isinstance(field, fields.Dict) and field.value_field is not None:
        values = field.value_field
        if not isinstance(value, Mapping):
            return None
        found = {k: _conversion(values, v) for k, v in value.items()}
        return {k: {"value": p} for k, p in found.items() if p}
    if isinstance(field, fields.Boolean):
        ok = isinstance(value, bool)
    elif isinstance(field, fields.Integer):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(field, fields.Float):
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    else:
        return None
    return None if ok else [field.error_messages["invalid"]]


def _each(value: Any, check: Callable[[Any], Any]) -> dict[int, Any]:
    if not isinstance(value, list):
        return {}
    found = {i: check(item) for i, item in enumerate(value)}
    return {i: p for i, p in found.items() if p}


def _merge(into: dict[Any, Any], extra: Mapping[Any, Any]) -> None:
    """Add ``extra``'s errors to ``into``'s, keeping those already found for a path."""
    for key, value in extra.items():
        if key not in into:
            into[key] = value
        elif isinstance(into[key], dict) and isinstance(value, Mapping):
            _merge(into[key], value)


def compatibility_problems(producer: Schema, consumer: Schema, path: str = "") -> list[str]:
    """Why ``consumer`` may refuse what ``producer`` emits; empty when they line up.

    Checked: every field the consumer requires is one the producer always
    emits, with a compatible type; and, when the consumer refuses unknown
    fields, the producer emits none the consumer does not know.
    """
    problems: list[str] = []
    pf, cf = producer.fields, consumer.fields
    for name, field in cf.items():
        where = f"{path}{name}"
        if field.required and (name not in pf or not pf[name].required):
            problems.append(
                f"{where}: required by the consumer but "
                + ("optional for the producer" if name in pf else "not produced")
            )
            continue
        if name in pf:
            problems += _field_problems(pf[name], field, where)
    if consumer.unknown == RAISE:
        for name in pf:
            if name not in cf:
                problems.append(f"{path}{name}: produced but unknown to the consumer")
    return problems


def check_handoff(producer: Contract, consumer: Contract, where: str) -> None:
    problems = compatibility_problems(producer.schema, consumer.schema)
    if problems:
        raise ContractMismatch(
            f"{where}: {consumer.ref} does not accept what {producer.ref} produces: "
            + "; ".join(problems)
        )


def _field_problems(p: fields.Field[Any], c: fields.Field[Any], where: str) -> list[str]:
    if isinstance(c, fields.Raw) and type(c) is fields.Raw:
        return []
    if isinstance(c, fields.Nested) and isinstance(p, fields.Nested):
        return compatibility_problems(_nested(p), _nested(c), f"{where}.")
    if isinstance(c, fields.List) and isinstance(p, fields.List):
        return _field_problems(p.inner, c.inner, f"{where}[]")
    if not isinstance(p, type(c)):
        return [f"{where}: produced as {type(p).__name__}, expected {type(c).__name__}"]
    return []


def _nested(f: fields.Nested) -> Schema:
    s = f.schema
    return s if isinstance(s, Schema) else Schema.from_dict({})()


def _describe_fields(schema: Schema) -> dict[str, Any]:
    field_rules: dict[str, list[str]] = {}
    # marshmallow keeps a schema's decorated methods in _hooks: tag -> (name, many, options)
    for method, _, options in schema._hooks[VALIDATES]:  # @validates("name", ...) methods
        for name in options.get("field_names", ()):
            field_rules.setdefault(name, []).append(method)
    out: dict[str, Any] = {}
    for name, f in schema.fields.items():
        entry: dict[str, Any] = {
            "type": type(f).__name__, "required": f.required, "allow_none": f.allow_none,
            "validators": [_describe_validator(v) for v in f.validators]
            + field_rules.get(name, []),
        }
        if isinstance(f, fields.Nested) and isinstance(f.schema, Schema):
            entry["fields"] = _describe_fields(f.schema)
            entry["schema_validators"] = _schema_rules(f.schema)
        out[name] = entry
    return out


def _schema_rules(schema: Schema) -> list[str]:
    """The names of a schema's ``@validates_schema`` methods."""
    return [method for method, _, _ in schema._hooks[VALIDATES_SCHEMA]]


def _describe_validator(validator: Any) -> str:
    """A field validator as its constructor call, arguments left at their defaults and
    error messages omitted: ``Range(min=0)``, ``OneOf(choices=['a', 'b'])``, ``Email()``;
    a plain function by its name."""
    if not isinstance(validator, validate.Validator):
        return str(getattr(validator, "__qualname__", None) or type(validator).__name__)
    args = []
    for param in inspect.signature(type(validator).__init__).parameters.values():
        if param.name in ("self", "error") or not hasattr(validator, param.name):
            continue
        value = getattr(validator, param.name)
        if param.kind is param.VAR_POSITIONAL:  # And(*validators)
            args += [_describe_validator(v) for v in value]
            continue
        if value == param.default or param.kind is param.VAR_KEYWORD or (
                param.default is None and value in ([], ())):  # OneOf keeps no labels as []
            continue
        if isinstance(value, re.Pattern):
            value = value.pattern
        elif isinstance(value, set | frozenset):
            value = sorted(value, key=str)
        elif isinstance(value, tuple):
            value = list(value)
        args.append(f"{param.name}={value!r}")
    return f"{type(validator).__name__}({', '.join(args)})"


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return type(value).__name__
