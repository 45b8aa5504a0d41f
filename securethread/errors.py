"""One exception hierarchy for securethread, split by who is at fault.

* :class:`ConfigurationError` -- the caller's setup is wrong (missing module, bad URI,
  unknown token, no PIN).
* :class:`HSMError` -- the token refused or failed; always raised ``from`` the PKCS#11
  exception so the CKR code stays visible.
* :class:`VerificationError` and its kin -- data that crossed a boundary is bad (wrong
  signature, malformed encoding, replay, wrong recipient, policy violation).
* :class:`QuotaExceededError` -- the job's quota is exhausted.

``ValueError``/``TypeError`` are reserved for programming errors inside the library.

:func:`exit_code_for` and :func:`describe` turn any of them into the CLI's documented exit
code and one line (docs/cli.md); they live here, not in the CLI, so the appliance answers its
operators with the same codes without importing the CLI.
"""

from __future__ import annotations

import signal


class Error(Exception):
    """Root of every error securethread raises on purpose."""


# --- configuration ---------------------------------------------------------------------


class ConfigurationError(Error):
    """The environment or the caller's configuration is wrong."""


class URIError(ConfigurationError):
    """A PKCS#11 URI (RFC 7512) is malformed or names something unsupported."""


class ModuleLoadError(ConfigurationError):
    """The PKCS#11 module could not be loaded (path missing or not a PKCS#11 library)."""


class TokenNotFoundError(ConfigurationError):
    """No token with the requested label is present."""


class PinMissingError(ConfigurationError):
    """No PIN source was configured for a token that needs a login."""


class TokenDirectoryError(ConfigurationError):
    """A SoftHSM configuration file or the token directory it names is missing or unusable."""


class TokenExistsError(ConfigurationError):
    """A token with this label already exists where a new one was to be initialised."""


class InsecurePinFileError(ConfigurationError):
    """A PIN file can be read or written by users other than its owner."""


class WorkdirEscapeError(ConfigurationError):
    """A work directory's token configuration points outside the directory."""


# --- token trouble ---------------------------------------------------------------------


class HSMError(Error):
    """The token refused or failed an operation."""


class PinIncorrectError(HSMError):
    """The token rejected the PIN."""


class TokenDamagedError(HSMError):
    """A token's files are damaged and no verified copy exists to restore them from."""


class KeyNotFoundError(HSMError):
    """No key or certificate with the requested label exists in the token."""


class DuplicateObjectError(HSMError):
    """An object with this label already exists where a new one was to be created."""


class TokenRecordError(HSMError):
    """A record the library keeps in a token (a CA's revocation state) is unreadable, or
    changed under a step that was updating it."""


class KeyPolicyError(Error):
    """A key was used for an operation its type or policy does not allow."""


# --- bad data --------------------------------------------------------------------------


class VerificationError(Error):
    """Data that crossed a trust boundary failed a check."""


class FormatError(VerificationError):
    """Bytes are malformed, non-canonical, truncated, oversized or of the wrong kind."""


class SignatureError(VerificationError):
    """A signature does not verify under the expected key."""


class InvalidPointError(VerificationError):
    """An EC public point is not on the expected curve."""


class DecryptionError(VerificationError):
    """Authenticated decryption failed: the ciphertext, nonce, AAD or tag was altered."""


class CertificateError(VerificationError):
    """A certificate or chain fails validation or violates the profile."""


class ProfileViolationError(CertificateError):
    """A certificate request violates the RFC 5280 profile securethread issues under."""


class ChannelError(VerificationError):
    """The secure channel protocol was violated (replay, reflection, wrong peer...)."""


class ReplayError(ChannelError):
    """A message was seen before or belongs to another session."""


class ConfirmationError(ChannelError):
    """A key-confirmation value does not match."""


class ImageError(VerificationError):
    """An encrypted image, its manifest or a chunk failed verification."""


class RollbackError(ImageError):
    """An image's security counter is below the device's minimum."""


class LicenseError(VerificationError):
    """A license is not for this device or image, or does not verify."""


class JobError(VerificationError):
    """A production job is expired, foreign, tampered or otherwise unusable."""


class DeviceRefusedError(VerificationError):
    """A device failed identification or is not allowed under the job."""


class AlreadyProvisionedError(DeviceRefusedError):
    """The device was already provisioned under this job."""


class NotTargetedError(DeviceRefusedError):
    """The device identifier is outside the job's targets."""


class LedgerError(VerificationError):
    """A ledger (or transcript) record is missing, reordered, duplicated or altered.

    ``index`` names the first bad record (0-based) where one can be named.
    """

    def __init__(self, message: str, *, index: int | None = None) -> None:
        super().__init__(message)
        self.index = index


class TranscriptError(LedgerError):
    """A ceremony transcript fails verification."""


# --- quota -----------------------------------------------------------------------------


class QuotaExceededError(Error):
    """The job's quota is exhausted; nothing was counted or released."""


# --- production state (the programmer's store and its quota mark, S7) ------------------


class StoreError(Error):
    """The production store cannot be used (unreadable, corrupt, locked, disk full)."""


class StoreCorruptError(StoreError):
    """The production store file is not a securethread store or is damaged."""


class StoreBusyError(StoreError):
    """Another process holds the production store's lock for longer than we wait."""


class StoreGuardError(StoreError):
    """The store does not match the quota mark its job left in the token (S7): it must be
    restored, never started afresh."""


class StoreMissingError(StoreGuardError):
    """The store of an opened job is missing, empty, or has no record of the job."""


class StoreReplacedError(StoreGuardError):
    """The store is another store than the one the job was opened in."""


class StoreRolledBackError(StoreGuardError):
    """The store is older than the token's quota mark says it must be."""


class QuotaMarkError(HSMError):
    """The quota mark in the token is unreadable or inconsistent."""


# --- exit codes and one-line descriptions (docs/cli.md, "Exit codes") --------------------

EXIT_OK, EXIT_OS, EXIT_CONFIG, EXIT_HSM, EXIT_VERIFY, EXIT_QUOTA, EXIT_STORE = range(7)
EXIT_INTERNAL = 70
EXIT_SIGINT, EXIT_SIGTERM = 128 + signal.SIGINT, 128 + signal.SIGTERM


class Interrupted(BaseException):
    """The command was interrupted by SIGTERM (exit code 128 + the signal number).

    Not an :class:`Exception`, like SIGINT's KeyboardInterrupt: a best-effort ``except
    Exception`` on the way (a cleanup that may fail) cannot swallow the signal."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


def exit_code_for(exc: BaseException) -> int:
    """The documented exit code for an exception: 2 configuration, 3 token, 4 verification,
    5 quota, 6 store, 128 + N for signal N, 1 any other :class:`Error` or OS error, 70 a bug."""
    if isinstance(exc, Interrupted):
        return exc.exit_code
    signalled = getattr(exc, "exit_code", None)  # RunInterruptedError, StationCallError
    if isinstance(exc, Error) and isinstance(signalled, int):
        return signalled
    if isinstance(exc, ConfigurationError):
        return EXIT_CONFIG
    if isinstance(exc, HSMError):
        return EXIT_HSM
    if isinstance(exc, QuotaExceededError):
        return EXIT_QUOTA
    if isinstance(exc, VerificationError):
        return EXIT_VERIFY
    if isinstance(exc, StoreError):
        return EXIT_STORE
    if isinstance(exc, Error):
        return EXIT_OS
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_SIGINT
    if isinstance(exc, OSError):
        return EXIT_OS
    return EXIT_INTERNAL


def name_exception(exc: BaseException, limit: int = 200) -> str:
    """One printable line naming an exception raised by untrusted input (a chip, a station,
    a file): its type and at most ``limit`` characters of its message."""
    text = "".join(c if c.isprintable() else "?" for c in str(exc))
    if len(text) > limit:
        text = text[:limit] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def describe(exc: BaseException) -> str:
    """The one stderr line for an exception: its type and message; anything not raised on
    purpose (not an :class:`Error` or OS error) is named an internal error."""
    if isinstance(exc, KeyboardInterrupt):
        return "Interrupted: stopped by SIGINT"
    if isinstance(exc, Interrupted):
        return f"Interrupted: {exc}"
    if isinstance(exc, OSError) and not isinstance(exc, Error):
        where = f" {exc.filename!r}" if exc.filename else ""
        return f"OSError: {exc.strerror or exc}{where}"
    if isinstance(exc, Error) and getattr(exc, "remote_type", None):
        return _one_line(str(exc))  # the appliance's own line (operator_api.RemoteError)
    if isinstance(exc, Error):
        return f"{type(exc).__name__}: {_one_line(str(exc))}"
    return f"internal error ({type(exc).__name__}: {_one_line(str(exc))}); please report it"
