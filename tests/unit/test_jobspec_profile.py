"""The job spec's [certificate] table: the device URI, revocation sources and the OEM's arc
reach the job's DeviceProfile; a bad value is one clear JobSpecError (exit 2)."""

from __future__ import annotations

import re
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


def test_prelicense_reads_its_profile_file_as_a_job_specs_table(tmp_path: Path) -> None:
    """``oem prelicense --profile``: the same [certificate] table and checks as a job spec
    (one parser, :func:`securethread.oem.jobspec.certificate_table`); no file: the OEM's name."""
    from securethread.oem.prelicense import _profile

    table = (
        'product = "s1"\ncommon_name = "dev-{device_id}"\n'
        'not_after = 2040-01-01T00:00:00.5Z\noem_arc = "1.3.6.1.4.1.32473.9"\n'
    )
    p = tmp_path / "profile.toml"
    p.write_text("[certificate]\n" + table)
    spec = load_job_spec(_spec(tmp_path, table))
    profile = _profile(p, "Acme")
    assert profile == spec.device_profile(default_organisation="Acme")
    assert profile.not_after is not None and profile.not_after.microsecond == 0
    assert _profile(None, "Acme") == DeviceProfile(organisation="Acme")
    for text, why in (
        ("[certificate]\nuri = 7\n", "certificate.uri must be a string"),
        ('[certificate]\nurl = "x"\n', "unknown key"),
        ('[window]\ndays = 1\n[certificate]\nproduct = "s1"\n', "only a [certificate] table"),
        ("", "[certificate] must be a table"),
        ("[certificate\n", "is not valid TOML"),
        ('[certificate]\noem_arc = "2.25.1"\n', "1.3.6.1.4.1"),
    ):
        p.write_text(text)
        with pytest.raises(ConfigurationError, match=re.escape(why)) as exc:
            _profile(p, "Acme")
        assert "\n" not in str(exc.value)
