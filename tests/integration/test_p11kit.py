"""Any PKCS#11 module: the library through p11-kit's proxy and remote (client/server) modules.

p11-kit-proxy.so and p11-kit-client.so export only ``C_GetFunctionList``; the library used to
call ``C_Initialize``/``C_Finalize`` by symbol and refused them (issue 19).  Here a real
``p11-kit server`` started by the test serves a SoftHSM token from a directory of its own on
a Unix socket, and the library, in a process that has no SoftHSM configuration at all, loads
p11-kit-client.so, creates an OEM root and a production CA in the remote token, issues a
device certificate and a CRL (every signature made behind the socket) and signs from four
threads at once.  Through p11-kit-proxy.so (in front of the same SoftHSM token, registered
by Debian's softhsm2 package) it also makes a license key wrap (ECDH -> KEK -> RFC 5649),
which the device side unwraps in software.  ``openssl verify`` checks what came back.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from securethread.demo import child_env
from securethread.hsm.module import SOFTHSM_MODULE_CANDIDATES
from tests.integration.test_field_tls import _need, _stop

TIMEOUT = 120.0
CLIENT_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so",
    "/usr/lib/aarch64-linux-gnu/pkcs11/p11-kit-client.so",
    "/usr/lib64/pkcs11/p11-kit-client.so",
    "/usr/lib/pkcs11/p11-kit-client.so",
)
PROXY_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/p11-kit-proxy.so",
    "/usr/lib/aarch64-linux-gnu/p11-kit-proxy.so",
    "/usr/lib64/p11-kit-proxy.so",
    "/usr/lib/p11-kit-proxy.so",
)


def _first(paths: tuple[str, ...], what: str) -> str:
    for p in paths:
        if os.path.exists(p):
            return p
    msg = f"{what} is not installed (bash scripts/install.sh installs p11-kit-modules)"
    if os.environ.get("CI") == "true":
        pytest.fail(msg)
    pytest.skip(msg)


@attrs.frozen
class Remote:
    conf: Path  # the SoftHSM configuration only the server (and the proxy) read
    tokendir: Path
    token: str
    pin: str
    address: str  # P11_KIT_SERVER_ADDRESS


@pytest.fixture(scope="module")
def remote(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Remote]:
    """A SoftHSM token in a directory of its own, served by ``p11-kit server``."""
    p11kit = _need("p11-kit")
    softhsm_util = _need("softhsm2-util")
    softhsm = _first(SOFTHSM_MODULE_CANDIDATES, "SoftHSM2")
    d = tmp_path_factory.mktemp("p11kit")
    tokendir = d / "tokens"
    tokendir.mkdir()
    conf = d / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokendir}\nobjectstore.backend = file\n")
    env = dict(child_env(), SOFTHSM2_CONF=str(conf))
    token, pin = f"remote-{uuid.uuid4().hex[:6]}", uuid.uuid4().hex
    subprocess.run(
        [softhsm_util, "--init-token", "--free", "--label", token, "--pin", pin,
         "--so-pin", uuid.uuid4().hex],
        env=env, check=True, capture_output=True, timeout=TIMEOUT,
    )  # fmt: skip
    server = subprocess.Popen(
        [p11kit, "server", "-f", "--provider", softhsm, "-n", str(d / "p11kit.sock"),
         f"pkcs11:token={token}"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert server.stdout is not None
        # it prints "P11_KIT_SERVER_ADDRESS=unix:path=...; export P11_KIT_SERVER_ADDRESS;"
        line = server.stdout.readline()
        assert line.startswith("P11_KIT_SERVER_ADDRESS="), (line, server.poll())
        address = line.split("=", 1)[1].split(";", 1)[0]
        yield Remote(conf, tokendir, token, pin, address)
    finally:
        _stop(server)


def _probe(module: str, remote: Remote, env: dict[str, str], *extra: str) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "tests.integration.p11kit_probe", module, remote.token,
         remote.pin, *extra],
        env=env, capture_output=True, text=True, timeout=TIMEOUT,
        cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def _objects(tokendir: Path) -> set[str]:
    return {Path(p).name for p in glob.glob(str(tokendir / "*" / "*.object"))}


def _openssl_checks(result: dict[str, Any], d: Path) -> None:
    """The chain made in the token verifies for TLS client use; its CRL revokes the device."""
    for name in ("root", "pca", "device", "crl"):
        (d / f"{name}.pem").write_text(result["pki"][name])
    base = [_need("openssl"), "verify", "-x509_strict", "-purpose", "sslclient",
            "-CAfile", "root.pem", "-untrusted", "pca.pem"]  # fmt: skip
    ok = subprocess.run([*base, "device.pem"], cwd=d, capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.strip() == "device.pem: OK", ok.stdout + ok.stderr
    revoked = subprocess.run(
        [*base, "-crl_check", "-CRLfile", "crl.pem", "device.pem"],
        cwd=d, capture_output=True, text=True,
    )  # fmt: skip
    assert revoked.returncode != 0 and "certificate revoked" in revoked.stdout + revoked.stderr


def test_the_library_through_p11_kit_client_and_a_real_server(
    remote: Remote, tmp_path: Path
) -> None:
    client = _first(CLIENT_CANDIDATES, "p11-kit-client.so")
    before = _objects(remote.tokendir)
    # no SoftHSM configuration in this process: the token is reachable only via the socket
    env = dict(child_env(), P11_KIT_SERVER_ADDRESS=remote.address)
    result = _probe(client, remote, env)
    assert result["shares_table"] is False  # p11-kit-client hands each caller its own table
    _openssl_checks(result, tmp_path)
    assert result["thread_failures"] == 0
    # the keys were created in the server's token: new object files in its directory
    created = _objects(remote.tokendir) - before
    assert len(created) >= 6, created  # root, production CA, thread key: 2 objects each + certs
    assert any(label.startswith("pca-") for label in result["labels"])
    # p11-kit 0.24's RPC carries only mechanisms whose parameters it can encode: ECDSA
    # signing crosses, CKM_ECDH1_DERIVE does not -- a clear HSMError, not a crash
    refused = result["derive_refused"]
    assert refused["type"] == "HSMError" and "MechanismInvalid" in refused["message"], refused


def test_the_library_through_p11_kit_proxy(remote: Remote, tmp_path: Path) -> None:
    proxy = _first(PROXY_CANDIDATES, "p11-kit-proxy.so")
    registered = glob.glob("/usr/share/p11-kit/modules/*.module") + glob.glob(
        "/etc/pkcs11/modules/*.module"
    )
    if not any("softhsm" in Path(p).read_text() for p in registered):
        msg = "SoftHSM is not registered with p11-kit (Debian's softhsm2 package does it)"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    env = dict(child_env(), SOFTHSM2_CONF=str(remote.conf))
    result = _probe(proxy, remote, env, "--derive")
    assert result["shares_table"] is False  # the proxy too: one state per caller
    _openssl_checks(result, tmp_path)
    assert result["thread_failures"] == 0  # p11-kit initialises SoftHSM with OS locking
    # the license wrap went through python-pkcs11's calls (no direct calls on the proxy)
    assert result["derive"] == {"wrapped": 40, "opens": True}


def test_softhsm_directly_keeps_its_direct_calls(remote: Remote, tmp_path: Path) -> None:
    """The same probe on SoftHSM itself: one static function table, re-initialised with
    CKF_OS_LOCKING_OK (without it four threads fail, docs/hsm.md), direct license calls."""
    softhsm = _first(SOFTHSM_MODULE_CANDIDATES, "SoftHSM2")
    env = dict(child_env(), SOFTHSM2_CONF=str(remote.conf))
    result = _probe(softhsm, remote, env, "--derive")
    assert result["shares_table"] is True
    _openssl_checks(result, tmp_path)
    assert result["thread_failures"] == 0
    assert result["derive"] == {"wrapped": 40, "opens": True}


def test_a_library_without_c_get_function_list_is_refused(tmp_path: Path) -> None:
    """A shared object that is not a PKCS#11 module: one clear ModuleLoadError."""
    from securethread.errors import ModuleLoadError
    from securethread.hsm.module import _function_list

    libz = next(iter(glob.glob("/usr/lib/*/libz.so.1") + glob.glob("/lib/*/libz.so.1")), None)
    if libz is None:
        pytest.skip("no libz.so.1 to stand in for a non-PKCS#11 library")
    with pytest.raises(ModuleLoadError, match="does not export C_GetFunctionList"):
        _function_list(libz)
