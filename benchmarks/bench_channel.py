"""Secure-channel benchmark: handshake time and key-transfer rate between two SoftHSM tokens.

    python benchmarks/bench_channel.py [--handshakes 20] [--keys 50] [--rounds 5]

Runs on its own temporary token directory (both tokens in this process, so the figures are
the HSM and protocol cost without a transport).  Prints the median handshake time, the
transfer rate (keys/s, OEM wrap + programmer unwrap/KCV/policy check + signed ack + ack
verification) and, side by side, the sealed-package rate.
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from softhsm_config import ensure_tokens  # noqa: E402

if TYPE_CHECKING:
    from cryptography import x509


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--handshakes", type=int, default=20)
    ap.add_argument("--keys", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-channel-") as tmp:
        pins = {t: (secrets.token_hex(8), secrets.token_hex(8)) for t in ("oem", "programmer")}
        ensure_tokens(tmp, pins.keys(), pins=pins).activate()

        from securethread.channel.handshake import ChannelSession, OemChannel, ProgrammerChannel
        from securethread.channel.transfer import (
            KeyReceiver,
            KeySender,
            MemoryPackageRegistry,
            open_package,
            seal_package,
        )
        from securethread.hsm import IMAGE_KEY, HsmPrivateKey, Token, open_token
        from securethread.pki import (
            EnclavePurpose,
            certify_enclave,
            create_enclave_csr,
            create_root_ca,
        )

        oem = open_token("oem", pin=lambda label: pins[label][1])
        prog = open_token("programmer", pin=lambda label: pins[label][1])
        root = create_root_ca(oem, label="root")
        root_key = oem.private_key("root")

        def enclave(
            tok: Token,
            label: str,
            name: str,
            purpose: EnclavePurpose,
            role: str,
            signer: HsmPrivateKey | None = None,
        ) -> x509.Certificate:
            csr = create_enclave_csr(
                tok, label=label, enclave_name=name, purpose=purpose, signer=signer
            )
            return certify_enclave(
                root_key,
                root,
                csr,
                enclave_name=name,
                purpose=purpose,
                role=role,
                proof_key=signer.public_key() if signer else None,
            )

        ident = EnclavePurpose.IDENTITY
        oem_cert = enclave(oem, "oem-id", "oem", ident, "oem")
        prog_cert = enclave(prog, "prog-id", "prog", ident, "programmer")
        ka_cert = enclave(
            prog,
            "prog-ka",
            "prog",
            EnclavePurpose.KEY_AGREEMENT,
            "programmer",
            signer=prog.private_key("prog-id"),
        )
        oem_id, prog_id = oem.private_key("oem-id"), prog.private_key("prog-id")

        def handshake() -> tuple[ChannelSession, ChannelSession]:
            o = OemChannel(
                oem,
                identity_key=oem_id,
                identity_cert=oem_cert,
                root_cert=root,
                expected_peer=prog_cert,
            )
            p = ProgrammerChannel(
                prog, identity_key=prog_id, identity_cert=prog_cert, root_cert=root
            )
            m3 = o.receive_hello(p.receive_hello(o.start()))
            m4 = p.receive_finish(m3)
            return o.receive_finish(m4), p.session

        handshake()  # warm-up
        times = []
        for _ in range(args.handshakes):
            t0 = time.perf_counter()
            a, b = handshake()
            times.append(time.perf_counter() - t0)
            a.close()
            b.close()
        hs_ms = statistics.median(times) * 1000
        print(
            f"handshake (4 messages, both tokens, median of {args.handshakes}): "
            f"{hs_ms:.2f} ms  (min {min(times) * 1000:.2f}, max {max(times) * 1000:.2f})"
        )

        rates, pkg_rates = [], []
        for r in range(args.rounds):
            labels = [f"k{r}-{uuid.uuid4().hex[:8]}" for _ in range(args.keys)]
            for lb in labels:
                oem.generate_aes(lb, policy=IMAGE_KEY)
            a, b = handshake()
            t0 = time.perf_counter()
            sender, receiver = KeySender(a), KeyReceiver(b)
            record = sender.verify_ack(receiver.receive(sender.send(labels)))
            sender.verify_committed(receiver.commit(sender.commit(record)))
            rates.append(args.keys / (time.perf_counter() - t0))
            a.close()
            b.close()
            for lb in labels:
                prog.destroy(lb)
            t0 = time.perf_counter()
            pkg = seal_package(
                oem,
                labels,
                identity_key=oem_id,
                identity_cert=oem_cert,
                expected_programmer=prog_cert,
                recipient_cert=ka_cert,
                root_cert=root,
            )
            open_package(
                pkg,
                backend=prog,
                ka_key=prog.private_key("prog-ka"),
                ka_cert=ka_cert,
                identity_key=prog_id,
                identity_cert=prog_cert,
                root_cert=root,
                registry=MemoryPackageRegistry(),
            )
            pkg_rates.append(args.keys / (time.perf_counter() - t0))
            for lb in labels:
                prog.destroy(lb)
                oem.destroy(lb)
        print(
            f"online transfer of {args.keys} AES-256 keys (persistent import, median of "
            f"{args.rounds}): {statistics.median(rates):.0f} keys/s"
        )
        print(
            f"sealed package of {args.keys} keys (seal + open, median of {args.rounds}): "
            f"{statistics.median(pkg_rates):.0f} keys/s"
        )
        oem.close()
        prog.close()


if __name__ == "__main__":
    main()
