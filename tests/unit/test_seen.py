"""Reconciliation's memory of devices (formats/seen.py) answers like a plain dict, across its
in-memory batches, the batch written last, the Bloom filter and the table."""

from __future__ import annotations

import random

import pytest

from securethread.formats import seen
from securethread.formats.seen import SeenDevices, _Filter


@pytest.mark.parametrize("batch", [1, 3, 64])
def test_answers_like_a_dict_across_batches(monkeypatch: pytest.MonkeyPatch, batch: int) -> None:
    monkeypatch.setattr(seen, "BATCH", batch)
    rng = random.Random(batch)
    model: dict[str, list[object]] = {}  # device -> [slot, point, programmed]
    with SeenDevices() as s:
        for n in range(400):
            device, slot, point = f"{n:016x}", n, rng.randbytes(65)
            assert not s.has_device(device) and not s.has_slot(slot) and not s.has_point(point)
            s.add(device, slot, point)
            model[device] = [slot, point, False]
            # program a device seen a while ago (in the table), or one just added
            old = f"{rng.randrange(n + 1):016x}"
            if not model[old][2] and rng.random() < 0.7:
                s.mark_programmed(old)
                model[old][2] = True
            probe = f"{rng.randrange(n + 1):016x}"
            slot_, point_, programmed = model[probe]
            assert s.provisioned(probe) == (slot_, point_, programmed)
            assert s.has_device(probe) and s.has_slot(slot_) and s.has_point(point_)  # type: ignore[arg-type]
        assert s.provisioned(f"{10_000:016x}") is None
        assert not s.has_point(b"\x04" * 65) and not s.has_slot(10_000)


@pytest.mark.parametrize("kind", ["point", "slot", "device_id"])
def test_the_filter_never_forgets_a_value(kind: str) -> None:
    f, rng = _Filter(), random.Random(1)

    def value(i: int) -> object:
        return {"point": rng.randbytes(65), "slot": i, "device_id": f"{i:016x}"}[kind]

    values = [value(i) for i in range(40_000)]
    for v in values:
        f.add(v)
    assert all(f.maybe(v) for v in values)
    absent = sum(f.maybe(value(i)) for i in range(40_000, 80_000))
    assert absent < 100  # ~0 false "maybe" at 40,000 values in 2**24 bits
