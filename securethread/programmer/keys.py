"""Flows 4-5 at the programming centre: receiving image keys, only ever wrapped.

* ``programmer receive-keys --listen HOST:PORT`` waits for one OEM session on one TCP
  connection; the key is stored in the token only after the OEM verified the signed
  acknowledgement and sent its commit (docs/channel.md) -- a connection dropped anywhere
  leaves the token as it was, and the step can be run again.
* ``programmer open-keys PACKAGE`` opens a package sealed to this enclave's key-agreement
  key and writes a receipt signed by the identity key to the outbox, for the OEM; killed at
  any instant, it is run again (see :func:`open_keys`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable

from securethread.channel.transfer import PackageReceipt, TokenPackageRegistry, open_package
from securethread.channel.transport import serve_key_session
from securethread.errors import FormatError
from securethread.formats.transcript import KeyEntry
from securethread.pki import from_pem
from securethread.programmer import layout as L
from securethread.workdir import StepResult, read_file


def receive_keys(
    workdir: str | os.PathLike[str],
    *,
    host: str,
    port: int,
    timeout: float = 300.0,
    ready: Callable[[tuple[str, int]], None] | None = None,
) -> StepResult:
    """Accept one OEM key session on ``host:port`` (0: any free port, reported to ``ready``)."""
    work = L.open_programmer(workdir)
    work.require(L.cert_path("identity"), step="receive-keys", needs="install-certs")
    token = work.open_token(L.TOKEN)
    identity = token.private_key(L.L_IDENTITY)
    result = serve_key_session(
        host,
        port,
        backend=token,
        identity_key=identity,
        identity_cert=token.certificate(L.L_IDENTITY),
        root_cert=from_pem(work.read(L.ROOT_CA, "OEM root certificate")),
        timeout=timeout,
        accept_timeout=timeout,
        ready=ready,
    )
    labels = [k.label for k in result.keys]
    tx = work.transcript(identity)
    tx.append(
        "key-import",
        keys=[KeyEntry.from_key(token.secret_key(label)) for label in labels],
        artefacts={"transfer": result.transfer_digest, "ack": hashlib.sha256(result.ack).digest()},
        details={"session": result.session_id.hex(), "oem": result.oem.hex()},
    )
    written = [work.write(f"keys/{label}.ack", result.ack) for label in labels]
    return work.finish(
        "programmer receive-keys",
        written,
        [tx],
        {"keys": labels, "session": result.session_id.hex(), "confirmed": result.confirmed},
    )


def open_keys(workdir: str | os.PathLike[str], package_path: str | os.PathLike[str]) -> StepResult:
    """Open a sealed key package; write the signed receipt to the outbox.

    The token marks a package imported (:class:`TokenPackageRegistry`) only after this step
    recorded its result (``undelivered/``): a run killed after that answers the next run with
    it, and a run killed after the keys were stored but before its result is redone with
    those keys (:func:`open_package`).
    """
    work = L.open_programmer(workdir)
    work.require(L.cert_path("identity"), step="open-keys", needs="install-certs")
    data = read_file(package_path, "sealed key package", limit=1 << 20)
    digest = hashlib.sha256(data).digest()
    step = f"programmer open-keys {digest.hex()}"
    token = work.open_token(L.TOKEN)
    registry = TokenPackageRegistry(token)
    if (earlier := work.undelivered(step)) is not None:
        # Killed after its answer was recorded: finish the token's mark if the kill came
        # first, and answer.
        try:
            package_id = bytes.fromhex(earlier.details["package"])
        except (KeyError, TypeError, ValueError):
            raise FormatError(f"{str(earlier.record)!r} is damaged") from None
        if not registry.seen(package_id):
            registry.record(package_id)
        return earlier
    identity = token.private_key(L.L_IDENTITY)
    results: list[StepResult] = []

    def answer(receipt: PackageReceipt) -> None:
        labels = [k.label for k in receipt.keys]
        tx = work.transcript(identity)
        last = tx.last
        if not (  # a run killed after this record: one record per import, not two
            last is not None
            and last.operation == "key-import"
            and dict(last.artefacts).get("sealed-package") == digest
        ):
            tx.append(
                "key-import",
                keys=[KeyEntry.from_key(token.secret_key(label)) for label in labels],
                artefacts={"sealed-package": digest},
                details={"package": receipt.package_id.hex(), "via": "sealed-package"},
            )
        out = work.write(f"outbox/key-receipt-{receipt.package_id.hex()}.bin", receipt.signed)
        written = [out, *(work.write(f"keys/{label}.ack", receipt.signed) for label in labels)]
        result = work.finish(
            "programmer open-keys",
            written,
            [tx],
            {"keys": labels, "receipt": out, "package": receipt.package_id.hex()},
        )
        results.append(work.pending(step, result))

    open_package(
        data,
        backend=token,
        ka_key=token.private_key(L.L_KA),
        ka_cert=token.certificate(L.L_KA),
        identity_key=identity,
        identity_cert=token.certificate(L.L_IDENTITY),
        root_cert=from_pem(work.read(L.ROOT_CA, "OEM root certificate")),
        registry=registry,
        answer=answer,
    )
    return results[0]
