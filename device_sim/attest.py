"""Attestation on the device: evidence over the server's nonce, the install token it earns, and
the installation credentials the server signs after an attested install.

An update notice with a nonce asks the device to prove itself with its attestation key before
it may fetch the image: the device answers with evidence (signed over the nonce, its name, the
image it runs and the manifest it is to install), and the server's next notice carries the install
token that the payload endpoints ask for. The fault profile can make a device replay an old
attestation or sign with a key nobody registered.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging

from fwcm import attestation, manifest, protocol
from fwcm.protocol import Notice, Result

from .device import Device, Refusal
from .transports import within

log = logging.getLogger(__name__)


class Attestation:
    """The device's attestation key and the install token it holds."""

    def __init__(self, device: Device, *, token_timeout: float) -> None:
        self.device = device
        self.token_timeout = token_timeout
        key = device.config.attest_key
        self._key = manifest.load_private_key(key) if key else None
        self.token: bytes | None = None
        """The install token payload fetches present (the last one the server gave)."""
        self._token_ready = asyncio.Event()

    def take_token(self, n: Notice) -> bool:
        """Keep the install token an update notice carries; whether it carries one."""
        token = n.extra.get(protocol.NOTICE_TOKEN)
        if not isinstance(token, bytes):
            return False
        self.token = token
        self._token_ready.set()
        return True

    def evidence(self, nonce: bytes, manifest_digest: bytes) -> bytes:
        """Evidence answering ``nonce``, kept in the persisted state; the token is awaited anew."""
        if self._key is None:
            raise Refusal(Result.ATTESTATION_REFUSED, "this device has no attestation key")
        self.token, self._token_ready = None, asyncio.Event()
        evidence = self._sign(nonce, manifest_digest)
        self.device.flash.state.evidence = evidence.hex()
        return evidence

    async def wait_for_token(self) -> None:
        """Until the server's notice brings the install token; refused if it does not in time."""
        try:
            await within(self._token_ready.wait(), self.token_timeout)
        except TimeoutError:
            raise Refusal(Result.ATTESTATION_REFUSED, "no install token after attesting") from None

    def _sign(self, nonce: bytes, manifest_digest: bytes) -> bytes:
        assert self._key is not None
        st, faults = self.device.flash.state, self.device.faults
        if faults.attest_replay:
            if st.evidence is not None:
                return bytes.fromhex(st.evidence)  # an attestation recorded earlier, replayed
            nonce = hashlib.sha256(b"recorded " + nonce).digest()[:16]  # a nonce of another time
        key = manifest.generate_private_key("es256") if faults.attest_forged else self._key
        active = hashlib.sha256(self.device.flash.active_image()).digest()
        ev = attestation.Evidence(nonce, self.device.config.name, active, manifest_digest)
        return attestation.make_evidence(key, ev)

    async def on_credential(self, n: Notice) -> None:
        """Keep the server-signed installation credential of an install this device made."""
        data = n.extra.get(protocol.NOTICE_CREDENTIAL)
        state = self.device.flash.state
        if not isinstance(data, bytes) or str(n.campaign) in state.credentials:
            return
        state.credentials[str(n.campaign)] = data.hex()
        self.device.flash.save()
        self.device.status.credentials = len(state.credentials)
        log.info("%s: installation credential for campaign %d stored", self.device.config.name, n.campaign)
