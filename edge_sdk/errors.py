"""The one rooted error hierarchy of edgefl.

Errors say whose fault it was. ``Local*`` errors mean this process did something
wrong (a bug or a misuse of the API); ``Remote*`` errors mean a peer sent
something wrong. Verification failures caused by untrusted peers must stay
opaque to the peer (reply with a generic rejection) and precise in the local
log and metrics, so these exceptions carry a machine-readable ``reason``.

Programmer mistakes (wrong types, out-of-range arguments) stay ``TypeError`` /
``ValueError`` with the offending value in the message.
"""

from __future__ import annotations

__all__ = [
    "BrokerError",
    "BrokerStartError",
    "BudgetExhaustedError",
    "ConfigError",
    "CryptoError",
    "DecodeError",
    "EdgeFLError",
    "InvalidCiphertextError",
    "InvalidSignatureError",
    "KeyFileError",
    "LedgerCorruptedError",
    "LocalProtocolError",
    "ModelError",
    "PrivacyError",
    "ProtocolError",
    "RemoteProtocolError",
    "SlotOverflowError",
    "UnsupportedOperatorError",
]


class EdgeFLError(Exception):
    """Root of every error edgefl raises on purpose.

    Attributes:
        reason: a short, stable, machine-readable code (used as a metrics label).
    """

    reason: str = "error"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class ConfigError(EdgeFLError):
    """A configuration file or option is invalid."""

    reason = "config"


class DecodeError(EdgeFLError):
    """Bytes from the wire or disk could not be decoded into a valid value."""

    reason = "decode"


class ProtocolError(EdgeFLError):
    """A protocol rule was broken."""

    reason = "protocol"


class LocalProtocolError(ProtocolError):
    """This process tried to do something the protocol does not allow."""

    reason = "local_protocol"


class RemoteProtocolError(ProtocolError):
    """A peer sent something the protocol does not allow."""

    reason = "remote_protocol"


class CryptoError(EdgeFLError):
    """A cryptographic operation or check failed."""

    reason = "crypto"


class InvalidCiphertextError(CryptoError):
    """A ciphertext is malformed, out of range or not a unit modulo n."""

    reason = "invalid_ciphertext"


class InvalidSignatureError(CryptoError):
    """A signature did not verify."""

    reason = "invalid_signature"


class KeyFileError(CryptoError):
    """A key file is missing, malformed, unsafe (permissions) or undecryptable."""

    reason = "key_file"


class SlotOverflowError(CryptoError):
    """A decrypted slot sum lies outside what honest contributions can reach.

    Attributes:
        slots: indices of the offending slots (in the flat parameter vector).
    """

    reason = "slot_overflow"

    def __init__(self, message: str, *, slots: tuple[int, ...] = ()) -> None:
        super().__init__(message)
        self.slots = slots


class PrivacyError(EdgeFLError):
    """A privacy rule or budget check failed."""

    reason = "privacy"


class BudgetExhaustedError(PrivacyError):
    """Taking part would exceed the device's privacy budget."""

    reason = "budget_exhausted"


class LedgerCorruptedError(PrivacyError):
    """The privacy ledger on disk is unreadable; never reset it silently."""

    reason = "ledger_corrupted"


class ModelError(EdgeFLError):
    """A model could not be loaded, built or trained."""

    reason = "model"


class UnsupportedOperatorError(ModelError):
    """An ONNX node uses an operator outside the differentiable set."""

    reason = "unsupported_operator"


class BrokerError(EdgeFLError):
    """The MQTT broker harness failed."""

    reason = "broker"


class BrokerStartError(BrokerError):
    """A broker did not start; the message names the cause and the log file."""

    reason = "broker_start"
