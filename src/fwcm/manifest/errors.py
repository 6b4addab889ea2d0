"""The codec's error types: callers catch exactly these and nothing else."""

from __future__ import annotations


class ManifestError(ValueError):
    """Bad input to the manifest codec: malformed CBOR, wrong shape, unsupported profile, bad key."""


class SignatureError(ManifestError):
    """The envelope carries no signature that verifies with any of the trusted keys."""
