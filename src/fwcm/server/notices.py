"""Notices: what each device is told, built when it is sent and handed to its transport's sender.

Update notices carry what the device needs besides the manifest: the attestation nonce, the
install token once the device attested, the install window, and the key ids of the tenant's
revoked signers, so a device learns of a revocation with its next notice. Consent campaigns add
their invitation to invite notices, and the group prepare flag and usage limits to update notices.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from fwcm import attestation, manifest
from fwcm.attestation import Grant
from fwcm.manifest import PrivateKey
from fwcm.protocol import (
    NOTICE_CREDENTIAL,
    NOTICE_INVITATION,
    NOTICE_LIMITS,
    NOTICE_PREPARE,
    NOTICE_REASON,
    NOTICE_TOKEN,
    Invitation,
    Notice,
    NoticeKind,
    UsageLimits,
    encode_notice,
)
from fwcm.rollout.consent import ConsentSpec
from fwcm.server import metrics
from fwcm.store.deployments import Target
from fwcm.transport.notices import NoticeSender, Render

REASON_CHARS = 100
"""A cancel or abort notice says why in at most this many characters."""


@dataclass
class Notifier:
    """Builds each device's notice and hands it to the sender of the device's transport."""

    senders: dict[str, NoticeSender] = field(default_factory=dict)
    """The notice sender of each device transport ("mqtt", "coap", "lwm2m")."""
    envelopes: dict[int, bytes] = field(default_factory=dict)
    windows: dict[int, tuple[int, int] | None] = field(default_factory=dict)
    """Install window per campaign (window mode "install"), carried in update notices."""
    revoked: dict[str, tuple[bytes, ...]] = field(default_factory=dict)
    """Key ids of revoked signers per tenant slug."""
    signing_key: PrivateKey | None = None
    """Signs installation credentials."""
    token_key: bytes | None = None
    """MACs install tokens."""
    invitations: dict[int, Invitation] = field(default_factory=dict)
    """Consent campaigns: what their invite notices carry."""
    extras: dict[int, dict[int, Any]] = field(default_factory=dict)
    """Per campaign: extension keys of its update notices (group prepare, usage limits)."""
    _facts: dict[int, tuple[bytes, bytes, int]] = field(default_factory=dict)
    _sent: dict[tuple[str, NoticeKind], Any] = field(default_factory=dict)

    def consent_notices(self, campaign: int, name: str, spec: ConsentSpec, deadline: float) -> None:
        """Remember what the notices of a consent campaign carry because of its consent rules."""
        self.invitations[campaign] = Invitation(
            requester=spec.requester or "",
            campaign_name=name,
            options=spec.options,
            deadline=int(deadline),
            initiator=spec.initiator or "",
        )
        limits = UsageLimits(
            max_uses=spec.max_uses,
            expires_after_s=int(spec.expires_after_s) if spec.expires_after_s else None,
            accounting_every_s=int(spec.accounting_every_s) if spec.accounting_every_s else None,
        ).to_map()
        extras: dict[int, Any] = {}
        if spec.group:
            extras[NOTICE_PREPARE] = True
        if limits:
            extras[NOTICE_LIMITS] = limits
        self.extras[campaign] = extras

    def facts(self, manifest_id: int) -> tuple[bytes, bytes, int]:
        """(manifest digest, image digest, sequence) of a loaded manifest."""
        found = self._facts.get(manifest_id)
        if found is None:
            env = manifest.decode_envelope(self.envelopes[manifest_id])
            found = self._facts[manifest_id] = (env.digest, env.info.image_digest, env.info.sequence)
        return found

    def grant(self, target: Target, campaign: int, manifest_id: int) -> Grant:
        digest, image, sequence = self.facts(manifest_id)
        now = int(time.time())
        return Grant(
            target.tenant,
            target.name,
            digest,
            image,
            campaign,
            expires=now + attestation.TOKEN_TTL_S,
            sequence=sequence,
            installed_at=now,
        )

    def build(
        self,
        target: Target,
        campaign: int,
        kind: NoticeKind,
        manifest_id: int,
        *,
        reason: str | None = None,
    ) -> bytes:
        """The sealed notice of ``kind`` for ``target``, as it stands now."""
        extra: dict[int, Any] = {}
        update = kind == NoticeKind.UPDATE
        if update and target.attested and self.token_key is not None:
            extra[NOTICE_TOKEN] = attestation.issue_token(
                self.token_key, self.grant(target, campaign, manifest_id)
            )
        if kind == NoticeKind.CREDENTIAL and self.signing_key is not None:
            extra[NOTICE_CREDENTIAL] = attestation.issue_credential(
                self.signing_key, self.grant(target, campaign, manifest_id)
            )
        if reason is not None:
            extra[NOTICE_REASON] = reason[:REASON_CHARS]
        if update:
            extra.update(self.extras.get(campaign, {}))
        if kind == NoticeKind.INVITE:
            extra[NOTICE_INVITATION] = self.invitations.get(campaign, Invitation()).to_map()
        notice = Notice(
            kind=kind,
            device=target.name,
            campaign=campaign,
            attempt=target.attempt,
            issued=int(time.time()),
            envelope=self.envelopes.get(manifest_id) if update else None,
            nonce=target.nonce if update else None,
            revoked=self.revoked.get(target.tenant, ()),
            window=self.windows.get(campaign) if update else None,
            extra=extra,
        )
        return encode_notice(target.secret, notice)

    def withdraw(self, tenant: str, device: str) -> None:
        """A decommissioned device: every transport withdraws what it keeps for it (MQTT clears
        its retained notice)."""
        for sender in self.senders.values():
            sender.clear_notice(tenant, device)

    def send(
        self,
        target: Target,
        campaign: int,
        kind: NoticeKind,
        manifest_id: int,
        *,
        reason: str | None = None,
    ) -> None:
        """Tell the device its notice changed; the sender builds it when (and if) it needs it."""
        self._carry(kind, [(target, partial(self.build, target, campaign, kind, manifest_id, reason=reason))])

    def send_all(
        self,
        targets: Iterable[Target],
        campaign: int,
        kind: NoticeKind,
        manifest_id: int,
        *,
        reason: str | None = None,
    ) -> None:
        """``send`` for each of ``targets``, the campaign's manifest being ``manifest_id`` (a
        target with a manifest of its own gets that), handed to each transport together."""
        self._carry(
            kind,
            [
                (t, partial(self.build, t, campaign, kind, t.manifest_id or manifest_id, reason=reason))
                for t in targets
            ],
        )

    def _carry(self, kind: NoticeKind, notices: list[tuple[Target, Render]]) -> None:
        by_transport: dict[str, list[tuple[str, str, Render]]] = {}
        for t, render in notices:
            by_transport.setdefault(t.transport, []).append((t.tenant, t.name, render))
        for transport, batch in by_transport.items():
            sender = self.senders.get(transport)
            if sender is not None:
                sender.send_notices(batch)
            counter = self._sent.get((transport, kind))
            if counter is None:  # the labelled child once: a label lookup per notice costs more
                counter = self._sent[(transport, kind)] = metrics.NOTICES_SENT.labels(
                    transport, kind.name.lower()
                )
            counter.inc(len(batch))
