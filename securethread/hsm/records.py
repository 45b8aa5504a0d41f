"""A record kept in a token across rewrites: generations of private data objects.

A data object's value cannot change (:mod:`securethread.hsm.data`), so a record that must
change -- a CA's revocation state -- is kept as generations: generation ``n + 1`` is created
beside ``n``, then every older one is destroyed.  A write cut short (a kill, a power cut:
SoftHSM does not fsync) leaves generation ``n``, whole.  The record is the newest generation
the caller's parser accepts.

The objects are private (CKA_PRIVATE, PKCS#11 v3.0 §4.4): only a process logged in with
the token's PIN can read, create or destroy them, so nothing done to the files *beside* the
token (a work directory's state files, deleted or replaced) can take a record back.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

import attrs

from ..errors import Error, TokenRecordError
from .data import DataObject, create_data, destroy_data, find_data
from .token import Token

T = TypeVar("T")

_GEN_OCTETS = 8


@attrs.frozen
class Generation(Generic[T]):
    """One generation of a record: its number and the caller's parsed value."""

    number: int
    value: T


class TokenRecord(Generic[T]):
    """The record ``label`` of ``application`` in ``token``; ``parse`` turns a generation's
    bytes into a value (raising a :class:`~securethread.errors.Error` for bytes it refuses)."""

    def __init__(
        self,
        token: Token,
        *,
        label: str,
        application: str,
        parse: Callable[[bytes], T],
        what: str,
    ) -> None:
        self._token = token
        self.label = label
        self.application = application
        self._parse = parse
        self.what = what

    def _generations(self) -> list[tuple[DataObject, Generation[T] | None]]:
        out: list[tuple[DataObject, Generation[T] | None]] = []
        for obj in find_data(self._token, label=self.label, application=self.application):
            gen: Generation[T] | None = None
            raw = obj.value
            if raw is not None and len(raw) > _GEN_OCTETS:
                try:
                    value = self._parse(raw[_GEN_OCTETS:])
                    gen = Generation(int.from_bytes(raw[:_GEN_OCTETS], "big"), value)
                except Error:
                    gen = None
            out.append((obj, gen))
        return out

    def read(self) -> Generation[T] | None:
        """The newest readable generation, ``None`` if the token never held the record.

        :class:`~securethread.errors.TokenRecordError` if objects exist but none can be
        read: the record is damaged, never treated as absent."""
        objs = self._generations()
        gens = [g for _o, g in objs if g is not None]
        if objs and not gens:
            raise TokenRecordError(
                f"token {self._token.name!r}: the {self.what} ({self.label!r}) is unreadable; "
                "restore the token from its backup"
            )
        return max(gens, key=lambda g: g.number, default=None)

    def write(self, payload: bytes, *, after: Generation[T] | None) -> int:
        """Create the generation after ``after`` (the one the caller read and built
        ``payload`` from; ``None`` for the first), then destroy every older generation but
        ``after``.  Refuses (:class:`TokenRecordError`, nothing written) if the record moved
        on since ``after`` was read: another process wrote it meanwhile."""
        objs = self._generations()
        newest = max((g.number for _o, g in objs if g is not None), default=None)
        expected = None if after is None else after.number
        if newest != expected:
            raise TokenRecordError(
                f"token {self._token.name!r}: the {self.what} ({self.label!r}) changed while "
                "this step ran (another process wrote it); run the step again"
            )
        number = 0 if after is None else after.number + 1
        self._parse(payload)  # never write what could not be read back
        create_data(
            self._token,
            label=self.label,
            application=self.application,
            value=number.to_bytes(_GEN_OCTETS, "big") + payload,
        )
        for obj, gen in objs:
            if gen is None or after is None or gen.number < after.number:
                destroy_data(self._token, obj)
        return number

    def exists(self) -> bool:
        """Whether the token holds any object of this record (readable or not)."""
        return bool(find_data(self._token, label=self.label, application=self.application))


__all__ = ["Generation", "TokenRecord"]
