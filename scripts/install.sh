#!/usr/bin/env bash
# Install everything securethread needs on Debian/Ubuntu: SoftHSM2, OpenSC (pkcs11-tool), the
# OpenSSL PKCS#11 engine (benchmark peer), mosquitto and its clients (the broker the device
# certificates are tested against), strace (token tests that kill at an exact system call),
# postgresql (the OEM registry's tests start a throwaway cluster with initdb/pg_ctl), nginx (the
# relying party that refuses off-ledger devices through the OEM's OCSP responder), gcc and
# libc6-dev (tests/integration/test_signals.py compiles a small LD_PRELOAD shim that puts a
# signal at the instant before a blocking wait), golang-go and gnutls-bin (relying parties
# nobody here wrote: a Go crypto/x509 + crypto/tls program and gnutls-serv/gnutls-cli/certtool
# check every certificate and CRL of a demo run, tests/integration/test_field_interop.py),
# p11-kit and p11-kit-modules (p11-kit server, p11-kit-client.so and p11-kit-proxy.so: the
# library through a proxy and a remote PKCS#11 module, tests/integration/test_p11kit.py), and
# a virtual environment with the package.
# Idempotent: skips apt when the packages are already there.
set -euo pipefail
cd "$(dirname "$0")/.."

DEBS=(softhsm2 opensc libengine-pkcs11-openssl openssl mosquitto mosquitto-clients strace
      postgresql nginx gcc libc6-dev golang-go gnutls-bin p11-kit p11-kit-modules)
missing=()
for p in "${DEBS[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
python_ok=$(python3 -c 'import sys; print(sys.version_info >= (3, 11))' 2>/dev/null || echo False)
if ! python3 -m venv --help >/dev/null 2>&1 || [ "$python_ok" != True ]; then
  missing+=(python3 python3-venv)
fi
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  echo "installing Debian packages: ${missing[*]}" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
python3 -c 'import sys; assert sys.version_info >= (3, 11), "securethread needs Python >= 3.11"'

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q -e '.[test,lint]'
echo "securethread installed in .venv ($(.venv/bin/python --version))" >&2
