"""The job spec's [certificate] table: the device URI, revocation sources and the OEM's arc
reach the job's DeviceProfile; a bad value is one clear JobSpecError (exit 2)."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from securethread.device.vendor import SiliconVendor
from securethread.errors import ConfigurationError
from securethread.oem.jobspec import load_job_spec
from securethread.pki import DeviceProfile

_SPEC = (
    'job_id = "j"\nprogrammer = "f-1"\nimage = "fw"\nquota = 3\nvendors = ["fab.pem"]\n'
    '[targets]\nranges = [["5ec0000000000000", "5ec0000000000002"]]\n[window]\ndays = 1\n'
    "[certificate]\n{certificate}"
)


def _spec(tmp_path: Path, certificate: str) -> Path:
    p = tmp_path / "j.toml"
    p.write_text(_SPEC.format(certificate=certificate))
    fab = SiliconVendor("Genuine Fab").root_certificate
    (tmp_path / "fab.pem").write_bytes(fab.public_bytes(serialization.Encoding.PEM))
    return p


def test_the_fields_reach_the_device_profile(tmp_path: Path) -> None:
    spec = load_job_spec(
        _spec(
            tmp_path,
            'uri = "https://devices.acme.example/{device_id}"\n'
            'crl_url = "http://pki.acme.example/j.crl"\n'
            'ocsp_url = "http://ocsp.acme.example/"\n'
            'oem_arc = "1.3.6.1.4.1.32473.9"\n',
        )
    )
    assert spec.device_profile(default_organisation="Acme") == DeviceProfile(
        organisation="Acme",
        uri_template="https://devices.acme.example/{device_id}",
        crl_url="http://pki.acme.example/j.crl",
        ocsp_url="http://ocsp.acme.example/",
        oem_arc="1.3.6.1.4.1.32473.9",
    )
    plain = load_job_spec(_spec(tmp_path, ""))
    assert plain.device_profile(default_organisation="Acme") == DeviceProfile(organisation="Acme")


@pytest.mark.parametrize(
    ("certificate", "why"),
    [
        ('url = "https://x.example/{device_id}"\n', "unknown key"),
        ("uri = 7\n", "certificate.uri must be a string"),
        ('uri = "devices/{device_id}"\n', "not an absolute URI"),
        ('crl_url = "https://pki.example/j.crl"\n', "http://"),
        ('ocsp_url = "http://"\n', "no host name"),
        ('oem_arc = "2.25.207020730509700419229912614853397683814"\n', "1.3.6.1.4.1"),
        ('oem_arc = "1.3.6.1.4.1.99999999999"\n', "2147483647"),
    ],
)
def test_a_bad_certificate_entry_is_one_clear_error(
    tmp_path: Path, certificate: str, why: str
) -> None:
    with pytest.raises(ConfigurationError, match=why) as exc:
        load_job_spec(_spec(tmp_path, certificate)).device_profile(default_organisation="Acme")
    assert "\n" not in str(exc.value)
