"""Child process of :func:`softhsm_config.ensure_tokens`: initialise missing tokens.

Reads ``{"module": path, "tokens": {label: [so_pin, user_pin]}}`` on stdin.  For each label
not yet present: C_InitToken on a free slot (PKCS#11 v2.40 §5.5; through ctypes, since
python-pkcs11 does not expose it), then C_InitPIN as the SO.  An SO PIN of ``null`` is
generated here and forgotten when this process exits: it never reaches the parent, a file
or the environment.  SoftHSM only offers a new free slot after re-initialisation, so the
module is reloaded after each token.  The parent holds the token directory's lock.
"""

from __future__ import annotations

import ctypes
import json
import secrets
import sys
from typing import Any

import pkcs11
from pkcs11 import TokenFlag

from securethread.hsm.pin import harden_process


def _labels(lib: Any) -> tuple[set[str], int | None]:
    present: set[str] = set()
    free: int | None = None
    for slot in lib.get_slots(token_present=True):
        token = slot.get_token()
        if token.flags & TokenFlag.TOKEN_INITIALIZED:
            present.add(token.label)
        elif free is None:
            free = slot.slot_id
    return present, free


def main() -> int:
    harden_process()  # SO and user PINs arrive on stdin
    request = json.load(sys.stdin)
    module = request["module"]
    cdll = ctypes.CDLL(module)
    cdll.C_InitToken.argtypes = [ctypes.c_ulong, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    lib = pkcs11.lib(module)
    for label, (so_pin, user_pin) in request["tokens"].items():
        present, free = _labels(lib)
        if label in present:
            continue
        if free is None:
            print(f"no free slot to create token {label!r}", file=sys.stderr)
            return 1
        if so_pin is None:
            so_pin = secrets.token_hex(16)
        so = so_pin.encode()
        padded = label.encode().ljust(32, b" ")  # CK_UTF8CHAR[32], blank padded
        rv = cdll.C_InitToken(free, so, len(so), padded)
        if rv != 0:
            print(f"C_InitToken({label!r}) returned 0x{rv:x}", file=sys.stderr)
            return 1
        lib.reinitialize()
        token = lib.get_token(token_label=label)
        with token.open(rw=True, so_pin=so_pin) as session:
            session.init_pin(user_pin)
        lib.reinitialize()
    return 0


if __name__ == "__main__":
    sys.exit(main())
