"""Re-sign a closed ledger after changing one record, as the threat model's programmer PIN
holder could: the ledger key in the party's token signs new checkpoints and a new close
record over the edited chain.  ``python -m tests.integration.resign_child WORKDIR LEDGER OUT
INDEX FIELD HEX`` sets field ``FIELD`` of record ``INDEX`` to the bytes ``HEX``.

It runs in its own process: the party's token directory is the only one it loads.
"""

from __future__ import annotations

import sys

from securethread.formats import cbor, envelope, ledger
from securethread.programmer import layout as L


def main(workdir: str, src: str, out: str, index: str, field: str, value: str) -> None:
    key = L.open_programmer(workdir).open_token(L.TOKEN).private_key(L.L_LEDGER)
    with open(src, "rb") as f:
        signed, items = ledger.read_export(f)
        items = list(items)
    bodies, checkpoints, close = [], [], None
    for tag, payload in items:
        if tag == ledger.TAG_RECORD:
            bodies.append(cbor.decode(payload))
        elif tag == ledger.TAG_CHECKPOINT:
            _kind, cp, _signers = envelope.peek_body(payload)
            checkpoints.append(cp)
        else:
            close = ledger.CloseRecord.from_obj(envelope.peek_body(payload)[1])
    assert close is not None, "the ledger is not closed"
    bodies[int(index)][field] = bytes.fromhex(value)
    out_items: list[tuple[str, bytes]] = []
    job = close.job  # record 0's prev is the job identity
    prev, uptos = job, {int(cp["upto"]): cp for cp in checkpoints}
    for seq, body in enumerate(bodies):
        body["prev"] = prev
        raw = cbor.encode(body)
        prev = ledger.sha256(raw)
        out_items.append((ledger.TAG_RECORD, raw))
        if seq in uptos:
            out_items.append((ledger.TAG_CHECKPOINT, ledger.sign_checkpoint(
                key, job=job, upto=seq, head=prev, time=int(uptos[seq]["time"]))))  # fmt: skip
    fresh = ledger.CloseRecord(
        job=job, records=close.records, provisioned=close.provisioned,
        programmed=close.programmed, head=prev, quota=close.quota,
        quota_used=close.quota_used, time=close.time,
    )  # fmt: skip
    out_items.append((ledger.TAG_CLOSE, ledger.sign_close(key, fresh)))
    with open(out, "wb") as f:
        ledger.write_export(f, signed, out_items)


if __name__ == "__main__":
    main(*sys.argv[1:7])
