"""Key attributes on the real SoftHSM tokens, against the table of docs/keys.md.

The keys come from the library's own code paths: root and enclave keys from the
``securethread.pki`` issue functions, the firmware-signing and officer keys as the OEM
ceremony makes them, the production CA for a job, the OEM's image keys, and the programmer's
copies of them through a real KeySender/KeyReceiver transfer over a channel between the
``oem`` and ``programmer`` tokens and through a sealed package.  All labels carry this
module's prefix, so the audit of the shared session tokens sees exactly these objects.
"""

from __future__ import annotations

import ctypes
import datetime
import os
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any

import attrs
import pkcs11
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass

from securethread.channel.handshake import OemChannel, ProgrammerChannel
from securethread.channel.transfer import (
    KeyReceiver,
    KeySender,
    MemoryPackageRegistry,
    TokenPackageRegistry,
    open_package,
    seal_package,
)
from securethread.errors import KeyPolicyError
from securethread.formats.transcript import KeyEntry
from securethread.hsm import Token
from securethread.hsm.data import create_data, destroy_data, find_data
from securethread.hsm.direct import calls_for
from securethread.hsm.policy import (
    certificate_template,
    private_template,
    public_template,
    secret_template,
)
from securethread.keys import SoftwareBackend
from securethread.keys.policy import (
    EPHEMERAL_AGREEMENT,
    IMAGE_KEY,
    NAMED_POLICIES,
    SIGNING,
    TEMP_CONFIRM,
    TEMP_DERIVE,
    TEMP_WRAP,
    Curve,
)
from securethread.pki import (
    EnclavePurpose,
    certify_enclave,
    certify_production_ca,
    create_enclave_csr,
    create_production_ca_csr,
    create_root_ca,
    install_certificate,
)
from securethread.programmer.quota_mark import APPLICATION as QUOTA_APP
from tests.integration.key_audit import (
    ATTRIBUTES,
    AuditReport,
    audit_token,
    load_table,
    missing_rows,
)

P = f"ka{uuid.uuid4().hex[:8]}/"  # this module's label prefix
CKR_ACTION_PROHIBITED = 0x1B
CKR_KEY_FUNCTION_NOT_PERMITTED = 0x68
NONCE = b"\x07" * 12
FIRMWARE = b"firmware block: only devices may read this"


@attrs.frozen
class Parties:
    root: x509.Certificate
    oem_identity: x509.Certificate
    programmer_identity: x509.Certificate
    ka_cert: x509.Certificate
    online_image: str  # label of the image key moved over the channel (both tokens)
    sealed_image: str  # ... and of the one moved in a sealed package


def _enclave(
    token: Token,
    root_key: Any,
    root: x509.Certificate,
    label: str,
    purpose: EnclavePurpose,
    role: str,
    signer: Any = None,
) -> x509.Certificate:
    name = f"{role}-{P[2:10]}"
    csr = create_enclave_csr(token, label=label, enclave_name=name, purpose=purpose, signer=signer)
    cert = certify_enclave(
        root_key,
        root,
        csr,
        enclave_name=name,
        purpose=purpose,
        role=role,
        proof_key=signer.public_key() if signer is not None else None,
    )
    install_certificate(token, label, cert)
    return cert


def _transfer_online(oem: Token, programmer: Token, parties: Parties, label: str) -> None:
    """A real channel between the two tokens, then KeySender -> KeyReceiver."""
    o = OemChannel(
        oem,
        identity_key=oem.private_key(P + "oem-identity"),
        identity_cert=parties.oem_identity,
        root_cert=parties.root,
        expected_peer=parties.programmer_identity,
    )
    p = ProgrammerChannel(
        programmer,
        identity_key=programmer.private_key(P + "programmer-identity"),
        identity_cert=parties.programmer_identity,
        root_cert=parties.root,
    )
    m4 = p.receive_finish(o.receive_hello(p.receive_hello(o.start())))
    sender, receiver = KeySender(o.receive_finish(m4)), KeyReceiver(p.session)
    record = sender.verify_ack(receiver.receive(sender.send([label])))
    sender.verify_committed(receiver.commit(sender.commit(record)))


def _transfer_sealed(oem: Token, programmer: Token, parties: Parties, label: str) -> None:
    data = seal_package(
        oem,
        [label],
        identity_key=oem.private_key(P + "oem-identity"),
        identity_cert=parties.oem_identity,
        expected_programmer=parties.programmer_identity,
        recipient_cert=parties.ka_cert,
        root_cert=parties.root,
    )
    open_package(
        data,
        backend=programmer,
        ka_key=programmer.private_key(P + "key-agreement"),
        ka_cert=parties.ka_cert,
        identity_key=programmer.private_key(P + "programmer-identity"),
        identity_cert=parties.programmer_identity,
        root_cert=parties.root,
        registry=MemoryPackageRegistry(),
    )


@pytest.fixture(scope="module")
def parties(oem: Token, programmer: Token, spare: Token) -> Iterator[Parties]:
    root = create_root_ca(oem, label=P + "oem-root-ca")
    root_key = oem.private_key(P + "oem-root-ca")
    ident = EnclavePurpose.IDENTITY
    oem_id = _enclave(oem, root_key, root, P + "oem-identity", ident, "oem")
    oem.generate_ec(P + "firmware-signing", curve=Curve.P256, policy=SIGNING)
    spare.generate_ec(P + "job-signing", curve=Curve.P256, policy=SIGNING)  # an officer token
    prog_id = _enclave(programmer, root_key, root, P + "programmer-identity", ident, "programmer")
    for purpose in (EnclavePurpose.LICENSE_SIGNING, EnclavePurpose.LEDGER_SIGNING):
        _enclave(programmer, root_key, root, P + purpose.value, purpose, "programmer")
    ka_cert = _enclave(
        programmer,
        root_key,
        root,
        P + "key-agreement",
        EnclavePurpose.KEY_AGREEMENT,
        "programmer",
        signer=programmer.private_key(P + "programmer-identity"),
    )
    pca = P + "production-ca-job1"
    csr = create_production_ca_csr(programmer, label=pca, job_id="job1")
    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    install_certificate(
        programmer, pca, certify_production_ca(root_key, root, csr, job_id="job1", not_before=now)
    )
    parties = Parties(root, oem_id, prog_id, ka_cert, P + "image-fw1", P + "image-fw2")
    for lb in (parties.online_image, parties.sealed_image):
        oem.generate_aes(lb, policy=IMAGE_KEY)
    _transfer_online(oem, programmer, parties, parties.online_image)
    _transfer_sealed(oem, programmer, parties, parties.sealed_image)
    # A quota mark as programmer/quota_mark.py writes it (a CKO_DATA object).
    create_data(programmer, label=P + "quota-mark-00ff", application=QUOTA_APP, value=b"m")
    yield parties
    for obj in find_data(programmer, label=P + "quota-mark-00ff", application=QUOTA_APP):
        destroy_data(programmer, obj)
    for token in (oem, programmer, spare):  # every key is destroyable (docs/keys.md rule 3)
        for cls in (ObjectClass.PRIVATE_KEY, ObjectClass.SECRET_KEY, ObjectClass.CERTIFICATE):
            for lb in token.labels(cls):
                if lb.startswith(P):
                    token.destroy(lb)


def _pin(token_label: str) -> str:
    return os.environ[f"SECURETHREAD_PIN_{token_label.upper()}"]


def _audit(token_dir: Any, token_label: str, party: str, prefix: str = P) -> AuditReport:
    return audit_token(token_dir.root, token_label, _pin(token_label), party=party, prefix=prefix)


# --- the audit of every object ------------------------------------------------------------------

_PAIR = ("private key", "public key")
_WITH_CERT = (*_PAIR, "certificate")
EXPECTED = {
    ("oem", "oem"): [
        *((P + "oem-root-ca", o) for o in _WITH_CERT),
        *((P + "oem-identity", o) for o in _WITH_CERT),
        *((P + "firmware-signing", o) for o in _PAIR),
        (P + "image-fw1", "secret key"),
        (P + "image-fw2", "secret key"),
    ],
    ("spare", "officer"): [(P + "job-signing", o) for o in _PAIR],
    ("programmer", "programmer"): [
        *(
            (P + name, o)
            for name in (
                "programmer-identity",
                "license-signing",
                "ledger-signing",
                "key-agreement",
                "production-ca-job1",
            )
            for o in _WITH_CERT
        ),
        (P + "image-fw1", "secret key"),
        (P + "image-fw2", "secret key"),
        (P + "quota-mark-00ff", "data"),
    ],
}


@pytest.mark.parametrize(("token_label", "party"), sorted(EXPECTED), ids=lambda v: str(v))
def test_every_object_matches_the_docs_table(
    parties: Parties, token_dir: Any, token_label: str, party: str
) -> None:
    report = _audit(token_dir, token_label, party)
    report.check()
    assert missing_rows(report, EXPECTED[(token_label, party)]) == []
    assert len(report.objects) == len(EXPECTED[(token_label, party)])
    assert all(o.placement is not None for o in report.objects)
    # Both halves and the certificate share the key's random CKA_ID: pkcs11-tool pairs them.
    for label in {o.label for o in report.objects if o.object != "data"}:
        ids = {o.key_id for o in report.objects if o.label == label}
        assert len(ids) == 1 and len(ids.pop()) in (32, 40), label  # AES: 16, EC: 20 bytes


def test_the_programmers_image_keys_are_wrap_only(parties: Parties, token_dir: Any) -> None:
    report = _audit(token_dir, "programmer", "programmer")
    report.check()
    images = [o for o in report.objects if o.label.startswith(P + "image-")]
    assert len(images) == 2
    for o in images:
        assert o.placement is not None and o.placement.policy == "PROGRAMMER_IMAGE_KEY"
        usages = {a for a in ("encrypt", "decrypt", "sign", "verify", "wrap", "unwrap", "derive")}
        assert not {a for a in usages if o.values[a]}
        assert o.values["extractable"] and o.values["sensitive"]
        assert not o.values["modifiable"] and not o.values["copyable"]


def test_the_audit_finds_unknown_and_wrong_objects(
    programmer: Token, token_dir: Any, parties: Parties
) -> None:
    """The audit can fail: a key no row names, an image key with the OEM's usages, and a
    modifiable, copyable key made by hand."""
    q = f"kq{uuid.uuid4().hex[:8]}/"
    programmer.generate_ec(q + "stray", curve=Curve.P256, policy=SIGNING)
    programmer.generate_aes(q + "image-wrong", policy=IMAGE_KEY)
    programmer.session.create_object(
        {
            Attribute.CLASS: ObjectClass.SECRET_KEY,
            Attribute.KEY_TYPE: KeyType.AES,
            Attribute.VALUE: os.urandom(32),
            Attribute.TOKEN: True,
            Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: True,
            Attribute.LABEL: q + "image-by-hand",
        }
    )
    try:
        report = _audit(token_dir, "programmer", "programmer", prefix=q)
        text = "\n".join(report.findings)
        assert f"private key '{q}stray': no row" in text
        assert f"public key '{q}stray': no row" in text
        for wrong in ("encrypt=True", "sign=True", "local=True"):
            assert f"'{q}image-wrong': {wrong}, PROGRAMMER_IMAGE_KEY documents False" in text
        for wrong in ("modifiable", "copyable"):
            assert f"'{q}image-by-hand': {wrong}=True, PROGRAMMER_IMAGE_KEY" in text
        with pytest.raises(AssertionError, match="differs from keys.md"):
            report.check()
    finally:
        for lb in ("stray", "image-wrong", "image-by-hand"):
            programmer.destroy(q + lb)


# --- the programmer's copy of the image key cannot decrypt ---------------------------------------


class _Mechanism(ctypes.Structure):  # CK_MECHANISM
    _fields_ = [
        ("mechanism", ctypes.c_ulong),
        ("pParameter", ctypes.c_void_p),
        ("ulParameterLen", ctypes.c_ulong),
    ]


class _GcmParams(ctypes.Structure):  # CK_GCM_PARAMS (PKCS#11 v2.40, SoftHSM 2.6.1)
    _fields_ = [
        ("pIv", ctypes.c_void_p),
        ("ulIvLen", ctypes.c_ulong),
        ("ulIvBits", ctypes.c_ulong),
        ("pAAD", ctypes.c_void_p),
        ("ulAADLen", ctypes.c_ulong),
        ("ulTagBits", ctypes.c_ulong),
    ]


def _c(token: Token, name: str) -> Any:
    fn = getattr(ctypes.CDLL(token.module_path), name)
    fn.restype = ctypes.c_ulong
    return fn


def _raw_gcm_decrypt(token: Token, label: str, ciphertext: bytes) -> tuple[int, bytes]:
    """C_DecryptInit(CKM_AES_GCM) + C_Decrypt with key ``label``, as anyone holding the
    token's PIN could call them (no library in between).  Returns (rv, plaintext)."""
    session = ctypes.c_ulong(token.session.handle)
    key = ctypes.c_ulong(token.secret_key(label)._obj().handle)
    iv = ctypes.create_string_buffer(NONCE, len(NONCE))
    params = _GcmParams(ctypes.addressof(iv), len(NONCE), 96, None, 0, 128)
    mech = _Mechanism(Mechanism.AES_GCM, ctypes.addressof(params), ctypes.sizeof(params))
    init = _c(token, "C_DecryptInit")
    init.argtypes = [ctypes.c_ulong, ctypes.POINTER(_Mechanism), ctypes.c_ulong]
    rv = init(session, ctypes.byref(mech), key)
    if rv != 0:
        return rv, b""
    out, out_len = ctypes.create_string_buffer(len(ciphertext)), ctypes.c_ulong(len(ciphertext))
    decrypt = _c(token, "C_Decrypt")
    decrypt.argtypes = [
        ctypes.c_ulong,
        ctypes.c_char_p,
        ctypes.c_ulong,
        ctypes.c_char_p,
        ctypes.POINTER(ctypes.c_ulong),
    ]
    rv = decrypt(session, ciphertext, len(ciphertext), out, ctypes.byref(out_len))
    return rv, out.raw[: out_len.value]


def _raw_init(token: Token, label: str, function: str, mechanism: int) -> int:
    mech = _Mechanism(mechanism, None, 0)
    init = _c(token, function)
    init.argtypes = [ctypes.c_ulong, ctypes.POINTER(_Mechanism), ctypes.c_ulong]
    return int(
        init(
            ctypes.c_ulong(token.session.handle),
            ctypes.byref(mech),
            ctypes.c_ulong(token.secret_key(label)._obj().handle),
        )
    )


@pytest.mark.parametrize("which", ["online", "sealed"])
def test_programmer_pin_cannot_decrypt_the_firmware(
    parties: Parties, oem: Token, programmer: Token, which: str
) -> None:
    """Issue 13: whoever holds the programmer PIN decrypted the firmware with one C_Decrypt.
    The token refuses now (CKR_KEY_FUNCTION_NOT_PERMITTED), and every other use too."""
    label = parties.online_image if which == "online" else parties.sealed_image
    ct = oem.secret_key(label).encrypt_gcm(NONCE, FIRMWARE, b"")
    rv, plaintext = _raw_gcm_decrypt(programmer, label, ct)
    assert plaintext != FIRMWARE, "the programmer token decrypted the firmware"
    assert rv == CKR_KEY_FUNCTION_NOT_PERMITTED
    for function, mechanism in (
        ("C_EncryptInit", Mechanism.AES_ECB),
        ("C_DecryptInit", Mechanism.AES_ECB),
        ("C_SignInit", Mechanism.AES_CMAC),
    ):
        assert _raw_init(programmer, label, function, mechanism) == CKR_KEY_FUNCTION_NOT_PERMITTED
    # ...and the library refuses before the token is asked.
    with pytest.raises(KeyPolicyError, match="not allowed to decrypt"):
        programmer.secret_key(label).decrypt_gcm(NONCE, ct, b"")


def _tool(token_dir: Any, token_label: str, *args: str) -> subprocess.CompletedProcess[str]:
    from securethread.hsm import default_module_path

    cmd = ["pkcs11-tool", "--module", default_module_path(), "--token-label", token_label]
    cmd += ["--login", "--pin", _pin(token_label), *args]
    env = {**os.environ, "SOFTHSM2_CONF": str(token_dir.conf)}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60, check=False)


def test_programmer_pin_cannot_decrypt_with_pkcs11_tool(
    parties: Parties, programmer: Token, token_dir: Any, tmp_path: Any
) -> None:
    """The same refusal for another process logged in with the programmer PIN (OpenSC)."""
    key_id = programmer.secret_key(parties.online_image).key_id.hex()
    block = tmp_path / "block"
    block.write_bytes(bytes(16))
    done = _tool(
        token_dir,
        "programmer",
        "--decrypt",
        "-m",
        "AES-ECB",
        "--type",
        "secrkey",
        "--id",
        key_id,
        "-i",
        str(block),
        "-o",
        str(tmp_path / "out"),
    )
    assert done.returncode != 0, "pkcs11-tool decrypted with the programmer's image key"
    assert "CKR_KEY_FUNCTION_NOT_PERMITTED" in done.stdout + done.stderr


def test_the_license_hot_path_still_wraps_the_programmers_copy(
    parties: Parties, oem: Token, programmer: Token
) -> None:
    """agree_and_wrap (ECDH -> ECB KEK -> AES-KWP, direct C calls) with the real key-agreement
    key: the device opens what the OEM encrypted; no session object is left behind."""
    ka = programmer.private_key(P + "key-agreement")
    before = len(list(programmer.session.get_objects({Attribute.TOKEN: False})))
    for label in (parties.online_image, parties.sealed_image):
        device = ec.generate_private_key(ec.SECP256R1())
        kdf_input = os.urandom(32)
        wrapped = ka.agree_and_wrap(device.public_key(), kdf_input, programmer.secret_key(label))
        from cryptography.hazmat.primitives import keywrap
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

        z = device.exchange(ec.ECDH(), ka.public_key())
        enc = Cipher(algorithms.AES(z[-32:]), modes.ECB()).encryptor()
        value = keywrap.aes_key_unwrap_with_padding(enc.update(kdf_input) + enc.finalize(), wrapped)
        ct = oem.secret_key(label).encrypt_gcm(NONCE, FIRMWARE, b"m")
        assert AESGCM(value).decrypt(NONCE, ct, b"m") == FIRMWARE
    assert len(list(programmer.session.get_objects({Attribute.TOKEN: False}))) == before


# --- nothing can be changed or copied ------------------------------------------------------------


def _library_objects(oem: Token, programmer: Token, parties: Parties) -> list[tuple[str, Any]]:
    def one(token: Token, cls: ObjectClass, label: str) -> Any:
        return token._find(cls, label)

    return [
        ("programmer image key", one(programmer, ObjectClass.SECRET_KEY, parties.online_image)),
        ("sealed image key", one(programmer, ObjectClass.SECRET_KEY, parties.sealed_image)),
        ("OEM image key", one(oem, ObjectClass.SECRET_KEY, parties.online_image)),
        ("root CA key", one(oem, ObjectClass.PRIVATE_KEY, P + "oem-root-ca")),
        ("root CA public key", one(oem, ObjectClass.PUBLIC_KEY, P + "oem-root-ca")),
        ("root certificate", one(oem, ObjectClass.CERTIFICATE, P + "oem-root-ca")),
        ("key-agreement key", one(programmer, ObjectClass.PRIVATE_KEY, P + "key-agreement")),
        ("production CA key", one(programmer, ObjectClass.PRIVATE_KEY, P + "production-ca-job1")),
    ]


def _widen(obj: Any) -> Attribute:
    """An attribute whose change would widen what the object allows."""
    if obj.object_class == ObjectClass.CERTIFICATE:
        return Attribute.LABEL
    return Attribute.DECRYPT if obj.object_class != ObjectClass.PUBLIC_KEY else Attribute.ENCRYPT


def test_set_attribute_and_copy_are_refused(
    parties: Parties, oem: Token, programmer: Token
) -> None:
    objects = _library_objects(oem, programmer, parties)
    session_keys: list[Any] = []
    eph = programmer.generate_ec("", curve=Curve.P256, policy=EPHEMERAL_AGREEMENT)
    z = eph.derive_aes(eph.public_key(), policy=TEMP_DERIVE)
    kek = z.derive_ecb(os.urandom(32), policy=TEMP_WRAP)
    session_keys += [kek, z, eph]
    objects += [("ephemeral key", eph._obj()), ("ECDH secret", z._obj()), ("KEK", kek._obj())]
    try:
        for name, obj in objects:
            attr = _widen(obj)
            before = obj[attr]
            new_value: Any = "renamed" if attr == Attribute.LABEL else True
            with pytest.raises(pkcs11.PKCS11Error, match="0x1b") as info:  # ACTION_PROHIBITED
                obj[attr] = new_value
            assert obj[attr] == before, name
            assert "0x1b" in str(info.value)
            with pytest.raises(pkcs11.PKCS11Error, match="0x1b"):
                obj.copy({Attribute.LABEL: P + "copy", _widen(obj): new_value})
        for token in (oem, programmer):
            assert not list(token.session.get_objects({Attribute.LABEL: P + "copy"}))
    finally:
        for k in session_keys:
            k.destroy()


def test_set_attribute_refused_for_another_process(
    parties: Parties, programmer: Token, token_dir: Any
) -> None:
    """pkcs11-tool --set-id (C_SetAttributeValue) on the programmer's image key fails."""
    key_id = programmer.secret_key(parties.online_image).key_id.hex()
    done = _tool(token_dir, "programmer", "--set-id", "00", "--type", "secrkey", "--id", key_id)
    assert done.returncode != 0
    # OpenSC 0.23 has no name for CKR_ACTION_PROHIBITED (PKCS#11 v2.40 §5.1).
    assert "C_SetAttributeValue failed" in done.stderr and "(0x1b)" in done.stderr
    programmer._forget(ObjectClass.SECRET_KEY, parties.online_image)
    assert programmer.secret_key(parties.online_image).key_id.hex() == key_id


# --- templates, session keys and the software backend against the docs --------------------------


def _template_for(policy_name: str, obj: str) -> dict[Attribute, Any]:
    if policy_name == "CERTIFICATE":
        return certificate_template()
    policy = NAMED_POLICIES[policy_name]
    make = {
        "private key": private_template,
        "public key": public_template,
        "secret key": secret_template,
    }[obj]
    return make(policy)


_NAME = {a: Attribute[a.upper().replace("-", "_")] for a in ATTRIBUTES}


def test_templates_say_what_the_docs_say() -> None:
    table = load_table()
    documented = {e.policy for e in table.expectations}
    assert set(NAMED_POLICIES) <= documented
    checked = 0
    for e in table.expectations:
        if e.object == "data":
            continue  # the registry's and quota marks' templates; their objects are checked
        template = _template_for(e.policy, e.object)
        for a in ATTRIBUTES:
            if _NAME[a] in template:
                assert bool(template[_NAME[a]]) is e.values[a], (e.policy, e.object, a)
                checked += 1
        assert template[Attribute.MODIFIABLE] is False and template[Attribute.COPYABLE] is False
        # CKA_MODIFIABLE last (SoftHSM applies derive/unwrap templates in order).
        assert list(template)[-1] == Attribute.MODIFIABLE
    assert checked > 100


def test_direct_call_templates_are_the_policy_templates(oem: Token) -> None:
    """hsm/direct.py builds its CK_ATTRIBUTE arrays from TEMP_DERIVE and TEMP_WRAP."""
    calls = calls_for(oem.module_path)
    assert calls is not None  # SoftHSM: one function table, direct calls
    for built, policy in ((calls._z_template, TEMP_DERIVE), (calls._kek_template, TEMP_WRAP)):
        values = {}
        for i in range(built.count.value):
            a = built.array[i]
            values[a.type] = ctypes.cast(a.pValue, ctypes.POINTER(ctypes.c_ubyte)).contents.value
        for attr, flag in secret_template(policy).items():
            assert values[int(attr)] == int(flag), (policy, attr)
        assert list(values)[-1] == int(Attribute.MODIFIABLE)


def _check_row(report: Any, policy: str, obj: str, made_by: str) -> None:
    expected = load_table().expectation(policy, obj, made_by)
    assert report.attributes() == dict(expected.values), (policy, obj, made_by)


def test_session_keys_of_every_code_path_match_the_docs(
    parties: Parties, oem: Token, programmer: Token
) -> None:
    """Temporaries, as the library's calls make them, and the software backend's twins."""
    sw = SoftwareBackend("sw")
    for backend in (programmer, sw):
        made: list[Any] = []
        try:
            eph = backend.generate_ec("", curve=Curve.P256, policy=EPHEMERAL_AGREEMENT)
            made.append(eph)
            _check_row(eph.policy_report(), "EPHEMERAL_AGREEMENT", "private key", "generated")
            z = eph.derive_aes(eph.public_key(), policy=TEMP_DERIVE)
            made.append(z)
            _check_row(z.policy_report(), "TEMP_DERIVE", "secret key", "derived")
            data = os.urandom(32)
            for name in ("TEMP_WRAP", "TEMP_UNWRAP", "TEMP_CONFIRM"):
                k = z.derive_ecb(data, policy=NAMED_POLICIES[name])
                made.append(k)
                _check_row(k.policy_report(), name, "secret key", "derived")
            wrap, unwrap = made[2], made[3]
            image = backend.generate_aes("", policy=attrs.evolve(IMAGE_KEY, persistent=False))
            made.append(image)
            staged = unwrap.unwrap(wrap.wrap(image), label="", key_id=b"", policy=TEMP_CONFIRM)
            made.append(staged)
            _check_row(staged.policy_report(), "TEMP_CONFIRM", "secret key", "unwrapped")
        finally:
            for k in reversed(made):
                k.destroy()
    # The public half of an ephemeral pair, read from the token.
    eph = oem.generate_ec("", curve=Curve.P256, policy=EPHEMERAL_AGREEMENT)
    try:
        pub = eph._temp_public
        expected = load_table().expectation("EPHEMERAL_AGREEMENT", "public key")
        for a in ("token", "private", "modifiable", "copyable", "destroyable", "verify"):
            assert bool(pub[_NAME[a]]) is expected.values[a], a
    finally:
        eph.destroy()


def test_channel_session_keys_match_the_docs(
    parties: Parties, oem: Token, programmer: Token
) -> None:
    o = OemChannel(
        oem,
        identity_key=oem.private_key(P + "oem-identity"),
        identity_cert=parties.oem_identity,
        root_cert=parties.root,
        expected_peer=parties.programmer_identity,
    )
    p = ProgrammerChannel(
        programmer,
        identity_key=programmer.private_key(P + "programmer-identity"),
        identity_cert=parties.programmer_identity,
        root_cert=parties.root,
    )
    m4 = p.receive_finish(o.receive_hello(p.receive_hello(o.start())))
    so, sp = o.receive_finish(m4), p.session
    _check_row(so.wrap_key.policy_report(), "TEMP_WRAP", "secret key", "derived")
    _check_row(sp.wrap_key.policy_report(), "TEMP_UNWRAP", "secret key", "derived")
    for s in (so, sp):
        _check_row(s.mac_key.policy_report(), "TEMP_CONFIRM", "secret key", "derived")
    with pytest.raises(KeyPolicyError, match="not allowed to unwrap"):
        so.wrap_key.unwrap(bytes(40), label="", key_id=b"", policy=TEMP_CONFIRM)
    with pytest.raises(KeyPolicyError, match="not allowed to wrap"):
        sp.wrap_key.wrap(programmer.secret_key(parties.online_image))


def test_persistent_keys_report_the_documented_attributes(
    parties: Parties, oem: Token, programmer: Token
) -> None:
    """What the library itself reads (policy_report, used by transcripts and S1 checks)."""
    _check_row(
        oem.private_key(P + "oem-root-ca").policy_report(), "SIGNING", "private key", "generated"
    )
    _check_row(
        programmer.private_key(P + "key-agreement").policy_report(),
        "KEY_AGREEMENT",
        "private key",
        "generated",
    )
    _check_row(
        oem.secret_key(parties.online_image).policy_report(), "IMAGE_KEY", "secret key", "generated"
    )
    for label in (parties.online_image, parties.sealed_image):
        report = programmer.secret_key(label).policy_report()
        _check_row(report, "PROGRAMMER_IMAGE_KEY", "secret key", "unwrapped")
        report.check(transferable=True)


# --- transcripts record the full attribute set ---------------------------------------------------


def test_transcript_entries_record_what_the_token_reports(
    parties: Parties, oem: Token, programmer: Token
) -> None:
    table = load_table()
    cases = [
        (programmer.secret_key(parties.online_image), "PROGRAMMER_IMAGE_KEY", "secret key"),
        (oem.secret_key(parties.online_image), "IMAGE_KEY", "secret key"),
        (programmer.private_key(P + "license-signing"), "SIGNING", "private key"),
    ]
    for key, policy, obj in cases:
        entry = KeyEntry.from_key(key)
        recorded = dict(entry.attributes)
        expected = table.expectation(policy, obj).values
        assert {a: recorded[a] for a in ATTRIBUTES} == dict(expected), policy
        assert KeyEntry.from_cbor(entry.to_cbor()) == entry
    # A caller cannot record a usage the token does not allow.
    with pytest.raises(KeyPolicyError, match="usage"):
        KeyEntry.from_key(
            programmer.secret_key(parties.online_image), attributes={"usage": ["decrypt"]}
        )
    with pytest.raises(KeyPolicyError, match="copyable"):
        KeyEntry.from_key(oem.secret_key(parties.online_image), attributes={"copyable": True})


def test_package_registry_records_match_the_docs(programmer: Token) -> None:
    """TokenPackageRegistry's records (label without this module's prefix: read in-process)."""
    package_id = os.urandom(16)
    TokenPackageRegistry(programmer).record(package_id)
    label = f"securethread-package:{package_id.hex()}"
    (obj,) = programmer.session.get_objects({Attribute.LABEL: label})
    try:
        expected = load_table().expectation("PACKAGE_RECORD", "data").values
        for a in ("token", "private", "modifiable", "copyable", "destroyable"):
            assert bool(obj[_NAME[a]]) is expected[a], a
    finally:
        obj.destroy()


def test_programmer_pin_can_derive_the_raw_ecdh_secret_of_the_key_agreement_key(
    parties: Parties, programmer: Token
) -> None:
    """A stated limit, measured (docs/threat-model.md, the PIN-holder row): the key-agreement
    key may derive, and PKCS#11 lets the caller choose the derived key's template, so whoever
    holds the programmer PIN can derive the raw ECDH secret with any public key as a
    non-sensitive, extractable secret and read it -- the secret a license to that key is
    wrapped under.  Plain PKCS#11 on SoftHSM cannot forbid it (no CKA_DERIVE_TEMPLATE in
    python-pkcs11, docs/keys.md); an HSM with usage-limited keys can."""
    peer = ec.generate_private_key(ec.SECP256R1())
    ka_public = parties.ka_cert.public_key()
    assert isinstance(ka_public, ec.EllipticCurvePublicKey)
    point = peer.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    raw = programmer.private_key(P + "key-agreement")._obj()
    secret = raw.derive_key(
        KeyType.GENERIC_SECRET,
        256,
        mechanism=Mechanism.ECDH1_DERIVE,
        mechanism_param=(pkcs11.KDF.NULL, None, point),
        template={Attribute.SENSITIVE: False, Attribute.EXTRACTABLE: True, Attribute.TOKEN: False},
    )
    try:
        value = secret[Attribute.VALUE]
    finally:
        secret.destroy()
    assert value == peer.exchange(ec.ECDH(), ka_public)
