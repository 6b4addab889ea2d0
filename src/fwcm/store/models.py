"""SQLAlchemy models: the durable state of tenants, devices, manifests and campaigns.

Every tenant-owned row carries ``tenant_id`` and every query filters on it.  Deployments are the
frozen (campaign, device) pairs created by one set-based INSERT … SELECT at campaign start.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Table,
    Text,
    UniqueConstraint,
    false,
    func,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from fwcm.versions import KEY_CHARS

# SQLite only autoincrements INTEGER PRIMARY KEY; PostgreSQL gets a bigint.
BigId = BigInteger().with_variant(Integer(), "sqlite")
BIGINT_MAX = 2**63 - 1
"""Largest value of a BIGINT column (ids, sequence numbers, sizes) on SQLite and PostgreSQL."""


def utcnow() -> datetime:
    """The time rows are stamped with: timezone-aware UTC."""
    return datetime.now(UTC)


VersionKey = String(KEY_CHARS).with_variant(String(KEY_CHARS, collation="C"), "postgresql")
"""A version sort key: compared byte by byte (SQLite's default; PostgreSQL's ``C`` collation)."""


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class Tenant(Base):
    __tablename__ = "tenants"
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    slug: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(16), default="fleet", server_default="fleet")
    """``fleet`` (owns devices and campaigns) or ``manufacturer`` (registers unclaimed devices)."""
    ca_cert_pem: Mapped[str | None] = mapped_column(Text, nullable=True)
    """The tenant CA certificate the operator issued: signer certificates must chain to it."""
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class ApiKey(Base):
    """API keys are stored as SHA-256 of the key: they are random, so a slow hash adds nothing.

    A key is named (unique among the tenant's keys not revoked) and has a role (``fwcm.roles``).
    Revoked keys stay, so a refused attempt can be told apart from a made-up key.
    """

    __tablename__ = "api_keys"
    __table_args__ = (
        Index(
            "ux_api_keys_active_name",
            "tenant_id",
            "name",
            unique=True,
            sqlite_where=text("revoked_at IS NULL"),
            postgresql_where=text("revoked_at IS NULL"),
        ),
    )
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(64))
    role: Mapped[str] = mapped_column(String(8), default="admin")
    """``viewer``, ``operator`` or ``admin``."""
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    """Written at most once a minute per key, so reads do not all write."""
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Signer(Base):
    """A public key the tenant trusts to sign manifests."""

    __tablename__ = "signers"
    __table_args__ = (UniqueConstraint("tenant_id", "name"),)
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(100))
    alg: Mapped[str] = mapped_column(String(16))
    key_id: Mapped[str] = mapped_column(String(64))
    public_key_pem: Mapped[str] = mapped_column(Text)
    cert_pem: Mapped[str | None] = mapped_column(Text, nullable=True)
    """Signer certificate (root → tenant CA → signer); None for a bare trusted key."""
    hardware_ids: Mapped[list[Any] | None] = mapped_column(JSON, nullable=True)
    """Developer signer: the only hardware its builds may target; None for production signers."""
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Payload(Base):
    """A firmware image, content-addressed by SHA-256; the bytes live in the payload store."""

    __tablename__ = "payloads"
    __table_args__ = (UniqueConstraint("tenant_id", "sha256"),)
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    size: Mapped[int] = mapped_column(BigInteger)
    name: Mapped[str | None] = mapped_column(String(200), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Manifest(Base):
    """A signed SUIT envelope, decoded fields kept beside the exact bytes that were signed."""

    __tablename__ = "manifests"
    __table_args__ = (UniqueConstraint("tenant_id", "digest"),)
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    digest: Mapped[str] = mapped_column(String(64))
    sequence: Mapped[int] = mapped_column(BigInteger)
    vendor_id: Mapped[str] = mapped_column(String(36))
    class_id: Mapped[str] = mapped_column(String(36), index=True)
    image_digest: Mapped[str] = mapped_column(String(64))
    image_size: Mapped[int] = mapped_column(BigInteger)
    uris: Mapped[list[Any]] = mapped_column(JSON)
    envelope: Mapped[bytes] = mapped_column(LargeBinary)
    signer_id: Mapped[int | None] = mapped_column(ForeignKey("signers.id"), nullable=True)
    name: Mapped[str | None] = mapped_column(String(200), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Device(Base):
    """A device of a tenant.  ``secret`` keys the COSE_Mac0 of every message it exchanges."""

    __tablename__ = "devices"
    __table_args__ = (
        UniqueConstraint("tenant_id", "name"),
        UniqueConstraint("factory_id", name="uq_devices_factory_id"),
        Index("ix_devices_tenant_class", "tenant_id", "class_id"),
    )
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(64))
    vendor_id: Mapped[str] = mapped_column(String(36))
    class_id: Mapped[str] = mapped_column(String(36))
    tags: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    sequence: Mapped[int] = mapped_column(BigInteger, default=0)
    version: Mapped[str | None] = mapped_column(String(64), nullable=True)
    version_key: Mapped[str | None] = mapped_column(VersionKey, nullable=True)
    """``fwcm.versions.version_key(version)``, set with it: filters order versions by it."""
    transport: Mapped[str] = mapped_column(String(8), default="mqtt")
    secret: Mapped[bytes] = mapped_column(LargeBinary)
    hardware_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    attest_key_pem: Mapped[str | None] = mapped_column(Text, nullable=True)
    """Public attestation key made at provisioning; attested campaigns need it."""
    factory_id: Mapped[int | None] = mapped_column(
        ForeignKey("factory_devices.id", name="fk_devices_factory_id"), nullable=True
    )
    """The manufacturer's record this device was claimed from: unique, so one owner at a time."""
    firmware_name: Mapped[str | None] = mapped_column(String(200), nullable=True)
    online: Mapped[bool] = mapped_column(default=False)
    last_seen: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    coap_address: Mapped[str | None] = mapped_column(String(80), nullable=True)
    """CoAP devices: the endpoint (``host:port``) they last observed from; notices are pushed there."""
    hello_seq: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    """Sequence number of the newest hello applied: an older one delivered late changes nothing."""
    claim_campaign: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    """The campaign whose confirmed success is what the device last said it runs (its claim);
    a later hello reporting another image marks that deployment ``reverted``."""
    claim_sequence: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    claim_digest: Mapped[str | None] = mapped_column(String(64), nullable=True)
    """SHA-256 (hex) of the image the claim names, when the success report carried it."""
    claim_hello_seq: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    """The hello of the boot that confirmed the claim (report key 16): earlier hellos say nothing
    about it, however late they arrive."""
    image_digest: Mapped[str | None] = mapped_column(String(64), nullable=True)
    """SHA-256 (hex) of the image the device last said it runs (hello or success, report key 15):
    the base a delta update is made from."""
    decommissioned_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    """Set when the device was taken out of service: no broker account, no campaigns, its messages
    refused; kept (with its history) until it is deleted."""
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Campaign(Base):
    __tablename__ = "campaigns"
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    manifest_id: Mapped[int] = mapped_column(ForeignKey("manifests.id"))
    filter: Mapped[str] = mapped_column(Text, default="")
    policy: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    state: Mapped[str] = mapped_column(String(16), default="draft", index=True)
    stop_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    note: Mapped[str | None] = mapped_column(Text, nullable=True)
    """Why a running campaign is not moving right now (window closed, rate limit), from the engine."""
    consent: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    """Consent campaigns: the checked ``[consent]`` table (deadline, quorum, options, variants…)."""
    consent_stage: Mapped[str | None] = mapped_column(String(16), nullable=True)
    """``asking`` → ``granted`` or ``refused``; None before the invitations went out."""
    granted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    group_decision: Mapped[str | None] = mapped_column(String(16), nullable=True)
    """Coordinated group install: ``commit`` or ``abort``, durable before any notice leaves."""
    attestation: Mapped[bool] = mapped_column(default=False, server_default=false())
    """Devices must attest (fresh nonce, attestation key) before they get an install token."""
    phase: Mapped[int] = mapped_column(Integer, default=0)
    total: Mapped[int] = mapped_column(Integer, default=0)
    reviewed: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    """What an operator accepted when resuming a stopped campaign (``rollout.planner.Review``): the
    engine does not stop it again for those failures."""
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    lease_owner: Mapped[str | None] = mapped_column(String(64), nullable=True)
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class Deployment(Base):
    """One device in one campaign: its state, attempt and the last report sequence applied."""

    __tablename__ = "deployments"
    # phase counts and the search for silent deployments are answered from this index alone
    __table_args__ = (Index("ix_deployments_progress", "campaign_id", "state", "updated_at", "phase"),)
    campaign_id: Mapped[int] = mapped_column(ForeignKey("campaigns.id", ondelete="CASCADE"), primary_key=True)
    device_id: Mapped[int] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True)
    tenant_id: Mapped[int] = mapped_column(BigInteger)
    state: Mapped[str] = mapped_column(String(16), default="pending")
    result: Mapped[int] = mapped_column(Integer, default=0)
    detail: Mapped[str | None] = mapped_column(String(200), nullable=True)
    phase: Mapped[int] = mapped_column(Integer, default=0)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    last_seq: Mapped[int] = mapped_column(BigInteger, default=-1)
    progress: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    notified_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    updated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    retry_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    choice: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    """Consent campaigns: the options the device accepted with (None: not accepted)."""
    manifest_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    """The variant this device gets, when it differs from the campaign's manifest."""
    delta_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    """The server-made patch (``deltas.id``) whose delta manifest is ``manifest_id``; cleared
    with it when the device falls back to the full image."""
    nonce: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    """Attestation nonce of the current attempt; cleared when used, so it is single-use."""
    nonce_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    attested_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class FactoryDevice(Base):
    """A device as its manufacturer registered it: unclaimed until a fleet tenant proves the claim code.

    ``owner_id`` is set by one conditional UPDATE (``… WHERE owner_id IS NULL``), so concurrent
    claims of one device have exactly one winner.
    """

    __tablename__ = "factory_devices"
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    manufacturer_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    serial: Mapped[str] = mapped_column(String(64), unique=True)
    hardware_id: Mapped[str] = mapped_column(String(128))
    vendor_id: Mapped[str] = mapped_column(String(36))
    class_id: Mapped[str] = mapped_column(String(36))
    firmware_version: Mapped[str | None] = mapped_column(String(64), nullable=True)
    sequence: Mapped[int] = mapped_column(BigInteger, default=0)
    claim_hash: Mapped[str] = mapped_column(String(64))
    """SHA-256 (hex) of the claim code printed on the box; the code itself is never stored."""
    secret: Mapped[bytes] = mapped_column(LargeBinary)
    attest_key_pem: Mapped[str | None] = mapped_column(Text, nullable=True)
    owner_id: Mapped[int | None] = mapped_column(ForeignKey("tenants.id"), nullable=True, index=True)
    claimed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class ServerKey(Base):
    """The key that signs install tokens and installation credentials, shared by all replicas."""

    __tablename__ = "server_keys"
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    private_pem: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class DeviceEvent(Base):
    """History of deployment state changes, trimmed to a bounded number per device."""

    __tablename__ = "device_events"
    __table_args__ = (Index("ix_device_events_device", "device_id", "id"),)
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(BigInteger)
    campaign_id: Mapped[int] = mapped_column(BigInteger, index=True)
    device_id: Mapped[int] = mapped_column(BigInteger)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    state: Mapped[str] = mapped_column(String(16))
    result: Mapped[int] = mapped_column(Integer, default=0)
    detail: Mapped[str | None] = mapped_column(String(200), nullable=True)


class AccountingRecord(Base):
    """Usage reported by installed software: interim counters, and a final record when its use
    ends (``final``) or it was removed again (``removed``)."""

    __tablename__ = "accounting_records"
    __table_args__ = (
        UniqueConstraint("campaign_id", "device_id", "attempt", "seq", name="uq_accounting_report"),
        Index("ix_accounting_campaign", "tenant_id", "campaign_id"),
    )
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(BigInteger)
    campaign_id: Mapped[int] = mapped_column(BigInteger)
    device_id: Mapped[int] = mapped_column(BigInteger)
    attempt: Mapped[int] = mapped_column(Integer)
    seq: Mapped[int] = mapped_column(BigInteger)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    kind: Mapped[str] = mapped_column(String(16))
    uses: Mapped[int] = mapped_column(BigInteger, default=0)
    seconds: Mapped[int] = mapped_column(BigInteger, default=0)
    detail: Mapped[str | None] = mapped_column(String(200), nullable=True)


class CampaignCount(Base):
    """How many of a campaign's deployments are in one (phase, state): kept by triggers on
    ``deployments`` (migration 0015), read through ``store.counts``; on PostgreSQL the newest
    changes are still in ``campaign_count_deltas``."""

    __tablename__ = "campaign_counts"
    campaign_id: Mapped[int] = mapped_column(ForeignKey("campaigns.id", ondelete="CASCADE"), primary_key=True)
    phase: Mapped[int] = mapped_column(Integer, primary_key=True)
    state: Mapped[str] = mapped_column(String(16), primary_key=True)
    n: Mapped[int] = mapped_column(BigInteger)


class CampaignCompletion(Base):
    """How many of a campaign's deployments ended in a charted state (``console.charts``) with
    their last change in one minute (POSIX seconds // 60): kept like ``CampaignCount``."""

    __tablename__ = "campaign_completions"
    campaign_id: Mapped[int] = mapped_column(ForeignKey("campaigns.id", ondelete="CASCADE"), primary_key=True)
    minute: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    state: Mapped[str] = mapped_column(String(16), primary_key=True)
    n: Mapped[int] = mapped_column(BigInteger)


campaign_count_deltas = Table(
    "campaign_count_deltas",
    Base.metadata,
    Column("campaign_id", BigInteger, nullable=False),
    Column("n", BigInteger, nullable=False),
    Column("left_phase", Integer),
    Column("left_state", String(16)),
    Column("left_minute", BigInteger),
    Column("phase", Integer),
    Column("state", String(16)),
    Column("minute", BigInteger),
    Index("ix_campaign_count_deltas_campaign", "campaign_id"),
)
"""PostgreSQL: ``n`` deployments of a campaign left (``left_*``; NULL for new ones) one phase,
state and, for a charted end, minute, and entered another (NULL for deleted ones); appended by
the triggers (no row lock shared between writers, no key to keep), folded into the totals by the
engine (``store.counts.fold``)."""


class CampaignEvent(Base):
    __tablename__ = "campaign_events"
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(BigInteger)
    campaign_id: Mapped[int] = mapped_column(BigInteger, index=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    state: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    kind: Mapped[str | None] = mapped_column(String(16), nullable=True)
    """``phase`` (a phase began), ``note`` (something happened, the state did not change) or None (a
    state change); webhooks tell them apart by it."""


class DeadLetter(Base):
    """A device message that passed every check but failed to apply, kept for its tenant to see.

    Ingest stores it here, acknowledges it and goes on; bounded to the newest rows per tenant.
    """

    __tablename__ = "dead_letters"
    __table_args__ = (Index("ix_dead_letters_tenant", "tenant_id", "id"),)
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    device: Mapped[str] = mapped_column(String(64))
    transport: Mapped[str] = mapped_column(String(8))
    payload: Mapped[bytes] = mapped_column(LargeBinary)
    """The message exactly as it arrived (a sealed report, or a presence flag)."""
    reason: Mapped[str] = mapped_column(String(16))
    error: Mapped[str] = mapped_column(String(200))
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Webhook(Base):
    """A URL of a tenant that receives signed events; the delivery worker of the replica holding
    its lease tails campaign and device events from its cursors into deliveries."""

    __tablename__ = "webhooks"
    __table_args__ = {"sqlite_autoincrement": True}  # a removed webhook's id is never reused
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    url: Mapped[str] = mapped_column(String(2048))
    secret: Mapped[str] = mapped_column(String(64))
    """HMAC key of the signatures; shown once at creation (the server needs it to sign)."""
    events: Mapped[list[Any] | None] = mapped_column(JSON, nullable=True)
    """Event types subscribed to; None: all."""
    campaign_cursor: Mapped[int] = mapped_column(BigInteger, default=0)
    """Newest ``campaign_events.id`` already turned into deliveries."""
    device_cursor: Mapped[int] = mapped_column(BigInteger, default=0)
    """Newest ``device_events.id`` already turned into deliveries."""
    flushed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    """When device failures were last batched into an event."""
    lease_owner: Mapped[str | None] = mapped_column(String(64), nullable=True)
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class WebhookDelivery(Base):
    """One event for one webhook: the exact body sent, and its last attempt (the delivery log)."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (Index("ix_webhook_deliveries_hook", "webhook_id", "state", "id"),)
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    webhook_id: Mapped[int] = mapped_column(ForeignKey("webhooks.id", ondelete="CASCADE"))
    event_id: Mapped[str] = mapped_column(String(64))
    type: Mapped[str] = mapped_column(String(40))
    body: Mapped[bytes] = mapped_column(LargeBinary)
    state: Mapped[str] = mapped_column(String(16), default="pending")
    """``pending`` (to try at ``next_at``), ``delivered`` or ``failed`` (given up)."""
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    last_status: Mapped[int | None] = mapped_column(Integer, nullable=True)
    last_error: Mapped[str | None] = mapped_column(String(200), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class WebhookAttempt(Base):
    """One try of a delivery: when, the HTTP status (None: no answer) and the error."""

    __tablename__ = "webhook_attempts"
    __table_args__ = (Index("ix_webhook_attempts_delivery", "delivery_id", "attempt"),)
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    delivery_id: Mapped[int] = mapped_column(ForeignKey("webhook_deliveries.id", ondelete="CASCADE"))
    attempt: Mapped[int] = mapped_column(Integer)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    status: Mapped[int | None] = mapped_column(Integer, nullable=True)
    error: Mapped[str | None] = mapped_column(String(200), nullable=True)


class AuditEntry(Base):
    """One mutating API request made with a valid key: who (key, role), what (method, route
    template, path parameters), the answer's status, when and from where.  Bounded per tenant."""

    __tablename__ = "audit_log"
    __table_args__ = (Index("ix_audit_log_tenant", "tenant_id", "id"),)
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    key_name: Mapped[str] = mapped_column(String(64))
    role: Mapped[str] = mapped_column(String(8))
    method: Mapped[str] = mapped_column(String(8))
    route: Mapped[str] = mapped_column(String(200))
    """The route template, e.g. ``/api/v1/campaigns/{campaign_id}/cancel``."""
    object: Mapped[dict[str, Any]] = mapped_column(default=dict)
    """The path parameters, e.g. ``{"campaign_id": "7"}``."""
    status: Mapped[int] = mapped_column(Integer)
    source: Mapped[str] = mapped_column(String(64))
    prev_hash: Mapped[str | None] = mapped_column(String(64), nullable=True)
    """``hash`` of the tenant's previous entry: the entries form a chain (``fwcm.audit_chain``)."""
    hash: Mapped[str | None] = mapped_column(String(64), nullable=True)
    """SHA-256 over this entry's fields and ``prev_hash``; None only for entries older than the chain."""


class SigningKey(Base):
    """A private key the server holds for a tenant in its key store (``fwcm.keystore``): the tenant
    CA's, or a signer's with the policy its releases follow.  Only the label is kept here."""

    __tablename__ = "signing_keys"
    __table_args__ = (UniqueConstraint("tenant_id", "purpose", "name"),)
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    purpose: Mapped[str] = mapped_column(String(8))
    """``ca`` (the tenant CA, name ``ca``) or ``signer`` (a manifest signer, name = signer name)."""
    name: Mapped[str] = mapped_column(String(100))
    store: Mapped[str] = mapped_column(String(8))
    """``pkcs11`` or ``file``: the key store the key was generated in."""
    label: Mapped[str] = mapped_column(String(100), unique=True)
    alg: Mapped[str] = mapped_column(String(16))
    public_key_pem: Mapped[str] = mapped_column(Text)
    approvals: Mapped[int] = mapped_column(Integer, default=0)
    """Approvals a release needs before this signer signs it (by keys other than the requester's)."""
    approver_role: Mapped[str] = mapped_column(String(8), default="admin")
    requester_role: Mapped[str] = mapped_column(String(8), default="operator")
    created_by: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Release(Base):
    """A request to have a server-held signer sign a manifest; signed once its approvals suffice."""

    __tablename__ = "releases"
    __table_args__ = (Index("ix_releases_tenant", "tenant_id", "id"),)
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    signing_key_id: Mapped[int] = mapped_column(ForeignKey("signing_keys.id", ondelete="CASCADE"))
    state: Mapped[str] = mapped_column(String(10))
    """``pending``, ``signed`` or ``rejected``."""
    sequence: Mapped[int] = mapped_column(BigInteger)
    vendor_id: Mapped[str] = mapped_column(String(36))
    class_id: Mapped[str] = mapped_column(String(36))
    image_digest: Mapped[str] = mapped_column(String(64))
    image_size: Mapped[int] = mapped_column(BigInteger)
    uris: Mapped[list[Any]] = mapped_column(JSON)
    name: Mapped[str | None] = mapped_column(String(200), nullable=True)
    requested_by: Mapped[str] = mapped_column(String(64))
    requested_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    decided_by: Mapped[str | None] = mapped_column(String(64), nullable=True)
    decided_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    reason: Mapped[str | None] = mapped_column(String(500), nullable=True)
    manifest_id: Mapped[int | None] = mapped_column(
        ForeignKey("manifests.id", ondelete="SET NULL"), nullable=True
    )


class ReleaseApproval(Base):
    """One key's approval of a release (a key approves a release at most once)."""

    __tablename__ = "release_approvals"
    __table_args__ = (UniqueConstraint("release_id", "key_name"),)
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    release_id: Mapped[int] = mapped_column(ForeignKey("releases.id", ondelete="CASCADE"), index=True)
    key_name: Mapped[str] = mapped_column(String(64))
    role: Mapped[str] = mapped_column(String(8))
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Delta(Base):
    """A patch from one base image to a manifest's image, made by the server for delta campaigns
    and kept for the next campaign; ``state`` skipped (with ``reason``) when none is worth sending."""

    __tablename__ = "deltas"
    __table_args__ = (UniqueConstraint("tenant_id", "manifest_id", "base_digest"),)
    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    manifest_id: Mapped[int] = mapped_column(ForeignKey("manifests.id", ondelete="CASCADE"))
    base_digest: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(8))
    reason: Mapped[str | None] = mapped_column(String(200), nullable=True)
    image_size: Mapped[int] = mapped_column(BigInteger)
    patch_digest: Mapped[str | None] = mapped_column(String(64), nullable=True)
    patch_size: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    """How long making the patch took."""
    delta_manifest_id: Mapped[int | None] = mapped_column(
        ForeignKey("manifests.id", ondelete="SET NULL"), nullable=True
    )
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
