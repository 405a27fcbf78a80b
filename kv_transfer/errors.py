"""Exceptions of kv_transfer. Every failure a caller can act on has its own class.

The control protocol carries an error ``code`` (see ``code`` class attributes); the receiving side maps it
back to the same class with ``error_from_code`` so a decode instance sees the prefill side's reason.
"""

from __future__ import annotations


class KVTransferError(RuntimeError):
    """Base class: a KV transfer failed or was refused."""

    code = "transfer"


class KVHandleError(KVTransferError, ValueError):
    """A KV handle is malformed, of an unknown version, or fails validation."""

    code = "handle"


class KVLayoutMismatchError(KVTransferError, ValueError):
    """The two sides' KV layouts are incompatible (refused before anything is copied)."""

    code = "layout"


class KVLeaseError(KVTransferError):
    """The lease named by a handle cannot be used."""

    code = "lease"


class KVLeaseUnknownError(KVLeaseError):
    code = "lease_unknown"


class KVLeaseExpiredError(KVLeaseError):
    code = "lease_expired"


class KVLeaseCancelledError(KVLeaseError):
    code = "lease_cancelled"


class KVLeaseReleasedError(KVLeaseError):
    """The lease was already acknowledged (its blocks are gone)."""

    code = "lease_released"


class KVIntegrityError(KVTransferError):
    """The checksum of the bytes that arrived differs from the one in the handle."""

    code = "integrity"


class KVProtocolError(KVTransferError):
    """A malformed control message, or a peer that broke the protocol."""

    code = "protocol"


_BY_CODE: dict[str, type[KVTransferError]] = {
    cls.code: cls
    for cls in (
        KVTransferError,
        KVHandleError,
        KVLayoutMismatchError,
        KVLeaseError,
        KVLeaseUnknownError,
        KVLeaseExpiredError,
        KVLeaseCancelledError,
        KVLeaseReleasedError,
        KVIntegrityError,
        KVProtocolError,
    )
}


def error_from_code(code: str, message: str) -> KVTransferError:
    """The exception for an error code received from a peer (unknown codes map to the base class)."""
    return _BY_CODE.get(code, KVTransferError)(message)
