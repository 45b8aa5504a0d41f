"""One field layer for every CBOR body: each field declared once, encode and strict decode
derived from the declaration.

A body is an ``@attrs.frozen`` class whose fields come from the factories below (each names
the field's CBOR map key and its rule) and which is decorated with :func:`body`::

    @fields.body("license", error=LicenseFormatError)
    @attrs.frozen(kw_only=True)
    class License:
        device_id: str = fields.text("device_id", pattern=DEVICE_ID)
        nonce: bytes = fields.byte_string("nonce", size=16)
        version: int = fields.version(1)

Three things follow from that one declaration:

* construction validates every field (attrs validators), so a body is valid once built;
* :func:`encode` gives the map the canonical CBOR encoder writes (RFC 8949 §4.2.1 sorts the
  keys, so declaration order does not matter and the wire bytes stay what they were);
* :func:`decode` takes a decoded CBOR map and accepts exactly the declared key set, exact
  types (a CBOR ``true`` is never the integer 1, RFC 8949 §3.3; a ``bytearray`` is never
  ``bytes``), the declared limits, and raises the body's error class naming the body and
  the field: ``license: field 'nonce' must be 16 bytes``.

Cross-field rules (``not_before < not_after``, counts that must add up) stay in the class's
``__attrs_post_init__``, which runs after every field has passed its own rule.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Iterable
from typing import Any, NoReturn, TypeVar

import attrs

from securethread.errors import Error, FormatError

__all__ = [
    "Absent",
    "Order",
    "Rule",
    "body",
    "boolean",
    "byte_string",
    "check",
    "constant",
    "custom",
    "decode",
    "encode",
    "integer",
    "list_of",
    "map_of",
    "matcher",
    "nested",
    "set_of",
    "text",
    "version",
]

_META = "securethread.cbor-field"
_U64 = (1 << 64) - 1
_NO: Any = attrs.NOTHING  # no constructor default: the field must be given
T = TypeVar("T")


class Absent(enum.Enum):
    """What an optional field's absence (the Python value ``None``) looks like on the wire."""

    OMIT = "omit"  # the key is left out of the map
    NULL = "null"  # the key is present with CBOR null (simple value 22, RFC 8949 §3.3)


class Order(enum.Enum):
    """The ordering rule of a list field."""

    ANY = "any"  # any order, repeats allowed
    UNIQUE = "unique"  # no item twice
    SORTED = "sorted"  # strictly ascending: one encoding per set of items


# --- rules: what one value must be -----------------------------------------------------------


#: An attrs validator: ``(instance, attribute, value)``; returns if ``value`` passes.
Validator = Callable[[Any, Any, Any], None]
#: Called by a validator whose value failed, with the instance and the value; raises.
Fail = Callable[[Any, Any], NoReturn]


class Rule:
    """What one value must be: a fast validator, the message when it fails, and the value's
    CBOR form (scalars are their own CBOR form)."""

    def validator(self, fail: Fail) -> Validator:
        """This rule as an attrs validator that calls ``fail`` on a bad value."""

        def check(inst: Any, _attribute: Any, value: Any) -> None:
            if self.problem(value) is not None:
                fail(inst, value)

        return check

    def problem(self, value: Any) -> str | None:
        """``None`` if ``value`` passes, else what it must be ("must be ...")."""
        raise NotImplementedError

    def explain(self, value: Any) -> str:
        """What a value that failed must be (only called once it has failed)."""
        return self.problem(value) or "is wrong"

    def to_cbor(self, value: Any) -> Any:
        return value

    def from_cbor(self, raw: Any) -> Any:
        return raw


# Scalar rules write their test once, inline in the validator (construction is on the
# per-device path), and their message once, in explain().


@attrs.frozen
class _Int(Rule):
    lo: int
    hi: int

    def validator(self, fail: Fail) -> Validator:
        lo, hi = self.lo, self.hi

        def check(inst: Any, _attribute: Any, v: Any) -> None:
            # type() is: bool is a subclass of int, and CBOR true must not pass as 1.
            if type(v) is not int or not lo <= v <= hi:
                fail(inst, v)

        return check

    def explain(self, value: Any) -> str:
        return f"must be an integer in {self.lo}..{self.hi}"


@attrs.frozen
class _Const(Rule):
    value: int | str
    label: str  # what a wrong value is called in the error ("version", "kind")

    def validator(self, fail: Fail) -> Validator:
        want, t = self.value, type(self.value)

        def check(inst: Any, _attribute: Any, v: Any) -> None:
            if type(v) is not t or v != want:
                fail(inst, v)

        return check

    def explain(self, value: Any) -> str:
        return f"must be {self.value!r} (unsupported {self.label} {value!r})"


@attrs.frozen
class _Bytes(Rule):
    lo: int
    hi: int

    def validator(self, fail: Fail) -> Validator:
        lo, hi = self.lo, self.hi

        def check(inst: Any, _attribute: Any, v: Any) -> None:
            if type(v) is not bytes or not lo <= len(v) <= hi:  # bytearray is not bytes
                fail(inst, v)

        return check

    def explain(self, value: Any) -> str:
        return f"must be {self.lo if self.lo == self.hi else f'{self.lo}..{self.hi}'} bytes"


@attrs.frozen
class _Text(Rule):
    lo: int
    hi: int
    pattern: re.Pattern[str] | None

    def validator(self, fail: Fail) -> Validator:
        lo, hi = self.lo, self.hi
        match = self.pattern.fullmatch if self.pattern is not None else None

        def check(inst: Any, _attribute: Any, v: Any) -> None:
            if type(v) is not str or not lo <= len(v) <= hi or (match and match(v) is None):
                fail(inst, v)

        return check

    def explain(self, value: Any) -> str:
        if type(value) is not str or not self.lo <= len(value) <= self.hi:
            return f"must be text of {self.lo}..{self.hi} characters"
        assert self.pattern is not None
        return f"must match {self.pattern.pattern}"


@attrs.frozen
class _Bool(Rule):
    def problem(self, value: Any) -> str | None:
        return None if type(value) is bool else "must be true or false"


@attrs.frozen
class _Nested(Rule):
    cls: type

    def problem(self, value: Any) -> str | None:
        return None if type(value) is self.cls else f"must be a {_spec(self.cls).name}"

    def to_cbor(self, value: Any) -> Any:
        return encode(value)

    def from_cbor(self, raw: Any) -> Any:
        return decode(self.cls, raw)


def _raise_problem(_inst: Any, _value: Any) -> NoReturn:
    raise _Problem


def _ascending(items: tuple[Any, ...]) -> bool:
    return all(a < b for a, b in zip(items, items[1:], strict=False))


def _item_problem(item: Rule, values: Any) -> str | None:
    check = item.validator(_raise_problem)
    for i, v in enumerate(values):
        try:
            check(None, None, v)
        except _Problem:
            return f"item {i} {item.explain(v)}"
    return None


@attrs.frozen
class _List(Rule):
    item: Rule
    lo: int
    hi: int
    order: Order

    def problem(self, value: Any) -> str | None:
        if type(value) is not tuple or not self.lo <= len(value) <= self.hi:
            return f"must list {self.lo}..{self.hi} items"
        return _item_problem(self.item, value) or self._order_problem(value)

    def _order_problem(self, value: tuple[Any, ...]) -> str | None:
        if self.order is Order.SORTED and not _ascending(value):
            return "must be strictly ascending (sorted, no repeats)"
        if self.order is Order.UNIQUE and len(set(value)) != len(value):
            return "must not repeat an item"
        return None

    def to_cbor(self, value: Any) -> Any:
        return [self.item.to_cbor(v) for v in value]

    def from_cbor(self, raw: Any) -> Any:
        if type(raw) is not list:
            raise _Problem(f"must be an array of {self.lo}..{self.hi} items")
        items = tuple(self.item.from_cbor(v) for v in raw)
        p = _item_problem(self.item, items) or self._order_problem(items)
        if p is not None:  # before any constructor converter could sort it (one encoding)
            raise _Problem(p)
        return items


@attrs.frozen
class _Set(Rule):
    item: Rule
    lo: int
    hi: int

    def problem(self, value: Any) -> str | None:
        if type(value) is not frozenset or not self.lo <= len(value) <= self.hi:
            return f"must hold {self.lo}..{self.hi} items"
        return _item_problem(self.item, tuple(value))

    def to_cbor(self, value: Any) -> Any:
        return [self.item.to_cbor(v) for v in sorted(value)]

    def from_cbor(self, raw: Any) -> Any:
        if type(raw) is not list:
            raise _Problem(f"must be an array of {self.lo}..{self.hi} items")
        items = tuple(self.item.from_cbor(v) for v in raw)
        p = _item_problem(self.item, items)
        if p is not None:
            raise _Problem(p)
        if not _ascending(items):  # a set has one encoding: its items in ascending order
            raise _Problem("must be strictly ascending (sorted, no repeats)")
        return frozenset(items)


@attrs.frozen
class _Tuple(Rule):
    items: tuple[Rule, ...]

    def problem(self, value: Any) -> str | None:
        if type(value) is not tuple or len(value) != len(self.items):
            return f"must be an array of {len(self.items)} items"
        for i, (rule, v) in enumerate(zip(self.items, value, strict=True)):
            p = _item_problem(rule, (v,))
            if p is not None:
                return p.replace("item 0", f"item {i}", 1)
        return None

    def to_cbor(self, value: Any) -> Any:
        return [rule.to_cbor(v) for rule, v in zip(self.items, value, strict=True)]

    def from_cbor(self, raw: Any) -> Any:
        if type(raw) is not list or len(raw) != len(self.items):
            raise _Problem(f"must be an array of {len(self.items)} items")
        return tuple(rule.from_cbor(v) for rule, v in zip(self.items, raw, strict=True))


@attrs.frozen
class _Map(Rule):
    """A map with text keys chosen by the writer: sorted ``(key, value)`` pairs in Python."""

    key: Rule
    value: Rule
    lo: int
    hi: int

    def problem(self, value: Any) -> str | None:
        if type(value) is not tuple or not self.lo <= len(value) <= self.hi:
            return f"must map {self.lo}..{self.hi} names"
        if any(type(p) is not tuple or len(p) != 2 for p in value):
            return "must be (name, value) pairs"
        for k, v in value:
            p = _item_problem(self.key, (k,))
            if p is not None:
                return f"name {k!r} {p.removeprefix('item 0 ')}"
            p = _item_problem(self.value, (v,))
            if p is not None:
                return f"{k!r} {p.removeprefix('item 0 ')}"
        if not _ascending(tuple(k for k, _ in value)):
            return "names must be sorted and unique"
        return None

    def to_cbor(self, value: Any) -> Any:
        return {k: self.value.to_cbor(v) for k, v in value}

    def from_cbor(self, raw: Any) -> Any:
        if type(raw) is not dict:
            raise _Problem(f"must be a map of {self.lo}..{self.hi} names")
        if not all(type(k) is str for k in raw):
            raise _Problem("must have text names")
        return tuple(sorted((k, self.value.from_cbor(v)) for k, v in raw.items()))


@attrs.frozen
class _OneOf(Rule):
    """A value passing any one of ``rules`` (tried in order; the first that takes it)."""

    rules: tuple[Rule, ...]

    def problem(self, value: Any) -> str | None:
        if any(_item_problem(r, (value,)) is None for r in self.rules):
            return None
        return " or ".join(
            (_item_problem(r, (value,)) or "").removeprefix("item 0 ") for r in self.rules
        )

    def to_cbor(self, value: Any) -> Any:
        for r in self.rules:
            if _item_problem(r, (value,)) is None:
                return r.to_cbor(value)
        raise ValueError("value passes none of the rules")

    def from_cbor(self, raw: Any) -> Any:
        for r in self.rules:
            try:
                value = r.from_cbor(raw)
            except (_Problem, Error):
                continue
            if _item_problem(r, (value,)) is None:
                return value
        return raw  # the constructor's validator names what it must be


class _Problem(Exception):
    """Internal: a value failed a rule during decode, before construction."""


# --- declaring fields ------------------------------------------------------------------------


@attrs.frozen
class _Field:
    key: str
    rule: Rule
    absent: Absent | None  # None: required


def _validator(f: _Field) -> Validator:
    """The attrs validator of one field: its rule, then the body's error naming the field."""

    def fail(inst: Any, value: Any) -> NoReturn:
        spec = _spec(inst if isinstance(inst, type) else type(inst))  # check() passes the class
        raise spec.error(f"{spec.name}: field {f.key!r} {f.rule.explain(value)}")

    check = f.rule.validator(fail)
    if f.absent is None:
        return check

    def check_optional(inst: Any, attribute: Any, value: Any) -> None:
        if value is not None:
            check(inst, attribute, value)

    return check_optional


def _field(key: str, rule: Rule, absent: Absent | None, **kw: Any) -> Any:
    """``default`` (in ``kw``) is the Python constructor's default; the key is still
    always written. An optional field's default is None, its absence."""
    if absent is not None:
        kw["default"] = None
    elif kw.get("default", None) is attrs.NOTHING:
        del kw["default"]
    f = _Field(key, rule, absent)
    return attrs.field(metadata={_META: f}, validator=_validator(f), **kw)


def integer(
    key: str, *, lo: int = 0, hi: int = _U64, absent: Absent | None = None, default: Any = _NO
) -> Any:
    """An exact integer in ``lo..hi`` (default: an unsigned 64-bit one)."""
    return _field(key, _Int(lo, hi), absent, default=default)


def version(value: int, *, key: str = "v") -> Any:
    """The format's version field: exactly the integer ``value`` (the default)."""
    return _field(key, _Const(value, "version"), None, default=value)


def constant(key: str, value: str | int) -> Any:
    """A field that always holds ``value`` (exact type): the tag of one variant of a union,
    such as a ledger record's ``kind``."""
    return _field(key, _Const(value, key), None, default=value)


def byte_string(
    key: str,
    *,
    size: int | None = None,
    min_len: int = 0,
    max_len: int | None = None,
    absent: Absent | None = None,
    default: Any = _NO,
) -> Any:
    """Exact ``bytes`` of ``size`` bytes, or of ``min_len..max_len`` bytes."""
    if (size is None) == (max_len is None):
        raise TypeError("byte_string needs exactly one of size= and max_len=")
    lo, hi = (size, size) if size is not None else (min_len, max_len)
    assert hi is not None
    return _field(key, _Bytes(lo, hi), absent, default=default)


def text(
    key: str,
    *,
    max_len: int,
    min_len: int = 1,
    pattern: str | re.Pattern[str] | None = None,
    absent: Absent | None = None,
    default: Any = _NO,
) -> Any:
    """An exact ``str`` of ``min_len..max_len`` characters, matching ``pattern`` in full."""
    rx = re.compile(pattern) if isinstance(pattern, str) else pattern
    return _field(key, _Text(min_len, max_len, rx), absent, default=default)


def boolean(key: str, *, absent: Absent | None = None, default: Any = _NO) -> Any:
    """Exactly ``True`` or ``False`` (CBOR simple values 20/21)."""
    return _field(key, _Bool(), absent, default=default)


def custom(key: str, rule: Rule, *, absent: Absent | None = None) -> Any:
    """A field with a format's own :class:`Rule` (a certificate kept parsed, say)."""
    return _field(key, rule, absent)


def nested(key: str, cls: type, *, absent: Absent | None = None) -> Any:
    """Another body (a class decorated with :func:`body`), as a CBOR map."""
    return _field(key, _Nested(cls), absent)


def list_of(
    key: str,
    item: Rule,
    *,
    max_len: int,
    min_len: int = 0,
    order: Order = Order.ANY,
    sort: bool = False,
    absent: Absent | None = None,
    default: Any = _NO,
) -> Any:
    """A tuple of ``min_len..max_len`` items, each passing ``item``, in ``order``
    (a CBOR array). ``sort``: the constructor sorts what Python callers give it; decode
    still refuses a wire array out of order. ``item``: one of the ``*_rule`` helpers."""
    if order is Order.SORTED and isinstance(item, _Nested | _List | _Set):
        raise TypeError("only lists of scalars can be required to be sorted")
    kw: dict[str, Any] = {"default": default, "converter": _as_tuple}
    if sort:
        if order is not Order.SORTED:
            raise TypeError("sort=True needs order=Order.SORTED")
        kw["converter"] = _sorted_tuple
    return _field(key, _List(item, min_len, max_len, order), absent, **kw)


def _as_tuple(value: Any) -> Any:
    return tuple(value) if type(value) is list else value


def _sorted_tuple(value: Any) -> Any:
    try:
        return tuple(sorted(value))
    except TypeError:  # unorderable items: left as they are for the rule to name
        return value


def map_of(
    key: str,
    name: Rule,
    value: Rule,
    *,
    max_len: int,
    min_len: int = 0,
    default: Any = _NO,
    converter: Callable[[Any], Any] | None = None,
) -> Any:
    """A CBOR map whose names the writer chooses (each passing ``name``, values passing
    ``value``): a tuple of ``(name, value)`` pairs sorted by name in Python, one order for
    one content. The constructor also takes a ``dict`` (or what ``converter`` takes)."""
    rule = _Map(name, value, min_len, max_len)
    return _field(key, rule, None, default=default, converter=converter or _sorted_pairs)


def _sorted_pairs(value: Any) -> Any:
    if isinstance(value, dict):
        value = tuple(value.items())
    if type(value) is tuple and all(type(p) is tuple and len(p) == 2 for p in value):
        names = [k for k, _ in value]
        if len(set(names)) == len(names) and all(type(k) is str for k in names):
            return tuple(sorted((k, _as_tuple(v)) for k, v in value))
    return value  # left for the rule to name


def one_of(*rules: Rule) -> Rule:
    """A value passing any one of ``rules`` (a map value that may be text or a number)."""
    return _OneOf(rules)


def list_rule(item: Rule, *, max_len: int, min_len: int = 0) -> Rule:
    """A list as an item of another rule (a tuple in Python, an array on the wire)."""
    return _List(item, min_len, max_len, Order.ANY)


def bool_rule() -> Rule:
    return _Bool()


def set_of(
    key: str, item: Rule, *, max_len: int, min_len: int = 0, default: Any = _NO
) -> Any:
    """A ``frozenset`` of ``min_len..max_len`` items, each passing ``item``: on the wire a
    CBOR array in strictly ascending order (one encoding per set, refused otherwise)."""
    return _field(key, _Set(item, min_len, max_len), None, default=default)


def tuple_rule(*items: Rule) -> Rule:
    """A fixed-length array, each position with its own rule (a tuple in Python)."""
    return _Tuple(items)


def int_rule(*, lo: int = 0, hi: int = _U64) -> Rule:
    return _Int(lo, hi)


def bytes_rule(*, size: int | None = None, min_len: int = 0, max_len: int | None = None) -> Rule:
    lo, hi = (size, size) if size is not None else (min_len, max_len)
    if hi is None:
        raise TypeError("bytes_rule needs size= or max_len=")
    return _Bytes(lo, hi)


def text_rule(*, max_len: int, min_len: int = 1, pattern: str | None = None) -> Rule:
    return _Text(min_len, max_len, None if pattern is None else re.compile(pattern))


def body_rule(cls: type) -> Rule:
    return _Nested(cls)


# --- the body: encode and strict decode ------------------------------------------------------


@attrs.frozen
class _Spec:
    name: str
    error: Callable[[str], Error]
    fields: tuple[tuple[str, _Field], ...]  # (attribute name, field)
    required: frozenset[str]
    allowed: frozenset[str]
    flat: bool  # every field is a required scalar: encode is a plain dict build
    validators: tuple[tuple[str, Validator], ...]  # (key, the field's validator) for check()


def body(name: str, *, error: Callable[[str], Error] = FormatError) -> Callable[[type[T]], type[T]]:
    """Class decorator: ``cls`` (an attrs class of field-layer fields) is the body called
    ``name`` in error messages; decode errors are raised as ``error(message)``."""

    def wrap(cls: type[T]) -> type[T]:
        items = []
        for a in attrs.fields(cls):  # type: ignore[arg-type]
            f = a.metadata.get(_META)
            if f is None:
                raise TypeError(f"{cls.__name__}.{a.name} is not a field-layer field")
            items.append((a.name, f))
        keys = [f.key for _, f in items]
        if len(set(keys)) != len(keys):
            raise TypeError(f"{cls.__name__} declares a CBOR key twice")
        cls.__securethread_body__ = _Spec(  # type: ignore[attr-defined]
            name=name,
            error=error,
            fields=tuple(items),
            required=frozenset(f.key for _, f in items if f.absent is None),
            allowed=frozenset(keys),
            flat=all(f.absent is None and type(f.rule).to_cbor is Rule.to_cbor for _, f in items),
            validators=tuple(
                (a.metadata[_META].key, a.validator)
                for a in attrs.fields(cls)  # type: ignore[arg-type]
            ),
        )
        return cls

    return wrap


def _spec(cls: type) -> _Spec:
    spec: _Spec | None = getattr(cls, "__securethread_body__", None)
    if spec is None:
        raise TypeError(f"{cls.__name__} is not declared with fields.body")
    return spec


def encode(obj: Any) -> dict[str, Any]:
    """The CBOR map of a body (give it to ``cbor.encode``)."""
    spec = _spec(type(obj))
    if spec.flat:
        return {f.key: getattr(obj, a) for a, f in spec.fields}
    out: dict[str, Any] = {}
    for a, f in spec.fields:
        v = getattr(obj, a)
        if v is None and f.absent is not None:
            if f.absent is Absent.NULL:
                out[f.key] = None
            continue
        out[f.key] = f.rule.to_cbor(v)
    return out


def _check_keys(spec: _Spec, raw: Any) -> None:
    if type(raw) is not dict:
        raise spec.error(f"{spec.name}: must be a CBOR map")
    keys = raw.keys()
    if keys != spec.required and not spec.required <= keys <= spec.allowed:
        missing = sorted(spec.required - keys)
        unknown = sorted(keys - spec.allowed)
        what = f"missing field {missing[0]!r}" if missing else f"unknown field {unknown[0]!r}"
        raise spec.error(f"{spec.name}: {what}")


def check(cls: type, raw: Any) -> None:
    """Check a decoded map against ``cls`` without building the object: for a verifier that
    reads many records and keeps their maps (the ledger). Flat bodies only."""
    spec = _spec(cls)
    if not spec.flat:
        raise TypeError(f"{spec.name} has nested or optional fields: use decode")
    _check_keys(spec, raw)
    for key, validate in spec.validators:
        validate(cls, None, raw[key])  # the class stands in for the instance (see fail)


# --- the hot path: recognise a flat body's map without building anything ------------------

_M_INT, _M_BYTES, _M_TEXT, _M_CONST, _M_RULE = range(5)
#: One field's test for :func:`matcher`: (key, test, a, b, c) as :func:`_plan_entry` says.
_PlanEntry = tuple[str, int, Any, Any, Any]


def _plan_entry(f: _Field) -> _PlanEntry:
    r = f.rule
    if type(r) is _Int:
        return (f.key, _M_INT, r.lo, r.hi, None)
    if type(r) is _Bytes:
        return (f.key, _M_BYTES, r.lo, r.hi, None)
    if type(r) is _Text:
        return (f.key, _M_TEXT, r.lo, r.hi, None if r.pattern is None else r.pattern.fullmatch)
    if type(r) is _Const:
        return (f.key, _M_CONST, r.value, type(r.value), None)
    return (f.key, _M_RULE, r.validator(_raise_problem), None, None)


def _canonical_keys(keys: Iterable[str]) -> tuple[str, ...]:
    """Text keys in RFC 8949 §4.2.1 order: by the bytes of their encodings, which for text
    keys is shorter UTF-8 first, then bytewise."""
    return tuple(sorted(keys, key=lambda k: (len(k.encode("utf-8")), k.encode("utf-8"))))


def _head(n: int) -> int:
    """Bytes of the shortest head carrying the argument ``n`` (RFC 8949 §3: additional
    information 0..23 in the initial byte, else 1, 2, 4 or 8 more bytes)."""
    return 1 if n < 24 else 2 if n < 1 << 8 else 3 if n < 1 << 16 else 5 if n < 1 << 32 else 9


def _text_size(s: str) -> int:
    n = len(s.encode("utf-8"))
    return _head(n) + n


def _const_size(value: int | str) -> int:
    if type(value) is str:
        return _text_size(value)
    assert type(value) is int
    return _head(value if value >= 0 else -1 - value)  # major type 1 carries -1 - n


#: The shortest head of the argument in ``m``, as an expression in the generated source.
_HEAD_OF_M = "(1 if m < 24 else 2 if m < 256 else 3 if m < 65536 else 5 if m < 4294967296 else 9)"

#: A compiled body test: the size of the map's canonical encoding if every field passes
#: (0 where a rule's encoding is not counted), else -1.
_Passes = Callable[[dict[str, Any]], int]


def _compile(name: str, plan: tuple[_PlanEntry, ...]) -> tuple[_Passes, bool]:
    """One function testing every field of ``plan`` inline (a loop over the plan costs
    twice as much per record) and adding up the size of the map's canonical encoding
    (RFC 8949 §4.2.1: shortest heads), and whether that size is exact (every rule a scalar
    one).  The source holds only the declaration's own keys and limits (``repr``); patterns
    and other rules are passed in by name, never as text."""
    env: dict[str, Any] = {"_Problem": _Problem}
    fixed = _head(len(plan)) + sum(_text_size(key) for key, *_ in plan)  # map head and keys
    sized = True
    lines = [f"def passes(raw):  # {name}", "    n = 0"]
    for i, (key, test, a, b, c) in enumerate(plan):
        lines.append(f"    v = raw[{key!r}]")
        grow = ""
        if test == _M_INT:
            cond = f"type(v) is not int or not {a!r} <= v <= {b!r}"
            arg = "v" if a >= 0 else "(v if v >= 0 else -1 - v)"
            grow = f"    m = {arg}\n    n += {_HEAD_OF_M}"
        elif test in (_M_BYTES, _M_TEXT):
            kind = "bytes" if test == _M_BYTES else "str"
            size = f"len(v) != {a!r}" if a == b else f"not {a!r} <= len(v) <= {b!r}"
            cond = f"type(v) is not {kind} or {size}"
            if c is not None:
                env[f"match{i}"] = c
                cond += f" or match{i}(v) is None"
            if test == _M_BYTES and a == b:
                fixed += _head(a) + a
            elif test == _M_BYTES:
                grow = f"    m = len(v)\n    n += m + {_HEAD_OF_M}"
            else:  # UTF-8 bytes, not characters
                grow = "    m = len(v) if v.isascii() else len(v.encode())\n" \
                       f"    n += m + {_HEAD_OF_M}"  # fmt: skip
        elif test == _M_CONST:
            cond = f"type(v) is not {b.__name__} or v != {a!r}"
            fixed += _const_size(a)
        else:
            env[f"rule{i}"] = a
            sized = False
            lines += ["    try:", f"        rule{i}(None, None, v)", "    except _Problem:",
                      "        return -1"]  # fmt: skip
            continue
        lines += [f"    if {cond}:", "        return -1"]
        if grow:
            lines.append(grow)
    lines.append(f"    return n + {fixed}" if sized else "    return 0")
    exec("\n".join(lines), env)  # noqa: S102 - source built above from the declaration only
    passes: _Passes = env["passes"]
    return passes, sized


#: What a :func:`matcher` returns for a map: its body class and the size of its canonical
#: encoding (``None`` if a rule's encoding is not counted), or ``None`` if no body matches.
Match = Callable[[Any], "tuple[type, int | None] | None"]


def matcher(classes: Iterable[type]) -> Match:
    """For a verifier's hot loop over many maps of a few flat bodies (the ledger's records):
    a function telling which of ``classes`` a decoded map is *exactly* -- its keys are the
    body's, in canonical order (RFC 8949 §4.2.1), and every value passes its field's rule
    with its exact type -- and how many bytes its canonical encoding takes, or ``None``.
    It builds no object and names no problem: on ``None`` call :func:`check`, whose error
    says what is wrong.  A map it accepts is one :func:`check` accepts and holds only
    scalars of exact types in canonical key order, so a decoder may let it stand in for its
    own type and key-order walk (:func:`securethread.formats.cbor.decode_matching`)."""
    by_keys: dict[tuple[str, ...], tuple[type, _Passes, bool]] = {}
    for cls in classes:
        spec = _spec(cls)
        if not spec.flat:
            raise TypeError(f"{spec.name} has nested or optional fields: use decode")
        order = _canonical_keys(spec.required)
        if order in by_keys:
            raise TypeError(f"{spec.name}: two bodies with the same keys cannot be told apart")
        passes, sized = _compile(spec.name, tuple(_plan_entry(f) for _, f in spec.fields))
        by_keys[order] = (cls, passes, sized)

    def match(raw: Any) -> tuple[type, int | None] | None:
        hit = by_keys.get(tuple(raw)) if type(raw) is dict else None
        if hit is None:
            return None
        size = hit[1](raw)
        if size < 0:
            return None
        return hit[0], size if hit[2] else None

    return match


def decode(cls: type[T], raw: Any) -> T:
    """The body ``cls`` from a decoded CBOR map: exactly the declared keys (optional ones
    may be absent as their :class:`Absent` rule says), every field passing its rule."""
    spec = _spec(cls)
    _check_keys(spec, raw)
    if spec.flat:  # required scalars only: the constructor's validators check each one
        return cls(**{a: raw[f.key] for a, f in spec.fields})
    kw: dict[str, Any] = {}
    for a, f in spec.fields:
        if f.key not in raw:  # only optional keys may be missing (checked above)
            if f.absent is Absent.NULL:
                raise spec.error(f"{spec.name}: missing field {f.key!r} (null when absent)")
            kw[a] = None
            continue
        v = raw[f.key]
        if v is None and f.absent is not None:
            if f.absent is Absent.OMIT:  # one encoding of absence: the key left out
                raise spec.error(f"{spec.name}: field {f.key!r} is left out when absent, not null")
            kw[a] = None
            continue
        try:
            kw[a] = f.rule.from_cbor(v)
        except _Problem as exc:
            raise spec.error(f"{spec.name}: field {f.key!r} {exc}") from None
        except Error as exc:  # a nested body's error, named under this field
            raise spec.error(f"{spec.name}: field {f.key!r}: {exc}") from None
    return cls(**kw)
