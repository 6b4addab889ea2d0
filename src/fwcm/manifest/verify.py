"""Verifying a decoded envelope's signatures against trusted keys (no I/O)."""

from __future__ import annotations

from collections.abc import Iterable

from . import cose
from .encode import suit_digest_of
from .errors import SignatureError
from .keys import PublicKey, key_id, public_of
from .model import Envelope


def verify_envelope(env: Envelope, keys: Iterable[PublicKey]) -> PublicKey:
    """Return the first trusted key that verifies a signature of ``env``; raise :class:`SignatureError`.

    A signature carrying a ``kid`` is only tried against the key with that id, so a signature can never
    be attributed to a different trusted key.
    """
    trusted = [(k, public_of(k)) for k in keys]
    if not trusted:
        raise SignatureError("no trusted keys to verify against")
    if not env.signatures:
        raise SignatureError("envelope carries no signature")
    payload = env.suit_digest or suit_digest_of(env.digest)
    known_kid = False
    for sig in env.signatures:
        for original, pub in trusted:
            if sig.kid is not None and sig.kid != key_id(pub):
                continue
            known_kid = True
            if cose.verify(pub, sig.alg, sig.signature, cose.to_be_signed(sig.protected, payload)):
                return original
    if not known_kid:
        kid = env.signatures[0].kid
        raise SignatureError(f"signed by an unknown key (kid {kid.hex()[:16] if kid else '-'})")
    raise SignatureError("signature does not verify")
