"""Request and response bodies of the management API (they make the OpenAPI document)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Annotated, Any, Generic, Self, TypeVar

from annotated_types import Interval
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, Strict, StrictInt, StrictStr

from fwcm import protocol
from fwcm.store.models import (
    BIGINT_MAX,
    Campaign,
    CampaignEvent,
    Device,
    DeviceEvent,
    Manifest,
    Payload,
    Signer,
)

RowId = Annotated[int, Interval(ge=1, le=BIGINT_MAX)]
"""An id in a path, query or body: outside the id column's range it is refused (422) before any
query runs (a database cannot compare a column with a number it cannot hold)."""
Offset = Annotated[int, Interval(ge=0, le=BIGINT_MAX)]
"""A list offset: at most what an SQL OFFSET takes."""
BodyId = Annotated[RowId, Strict()]
"""An id in a JSON body: a number, never ``true`` or ``"1"``."""
BodyInt = Annotated[int, Strict(), Interval(ge=-BIGINT_MAX - 1, le=BIGINT_MAX)]
"""A whole number in a JSON body (never a boolean), within a BIGINT column's range."""


MAX_PAGE = 10000
"""The most items one page of a list may hold."""
Limit = Annotated[int, Interval(ge=1, le=MAX_PAGE)]
"""How many items a list answers at most (``?limit=``)."""


def as_utc(value: datetime) -> datetime:
    """Stored times are UTC; SQLite hands them back without a zone, so one is attached here."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


Timestamp = Annotated[datetime, AfterValidator(as_utc)]
"""Every time in an answer: RFC 3339 in UTC, e.g. ``2026-12-01T18:00:00Z``."""

T = TypeVar("T")


class Page(BaseModel, Generic[T]):
    """The one shape of every list: a page of ``items`` and where it sits in the whole."""

    items: list[T]
    total: int = Field(description="How many items the list holds in all (every page).")
    limit: int = Field(description="The most items this page could hold (``?limit=``).")
    offset: int = Field(description="How many items come before this page (``?offset=``).")

    @classmethod
    def of(cls, total: int, limit: int, offset: int, items: Sequence[Any]) -> Self:
        return cls(items=list(items), total=total, limit=limit, offset=offset)


class ErrorOut(BaseModel):
    detail: str = Field(description="One sentence naming the problem.")


class TenantOut(BaseModel):
    id: int
    slug: str
    name: str
    created_at: Timestamp | None


class PayloadOut(BaseModel):
    sha256: str
    size: int
    name: str | None
    created_at: Timestamp | None
    created: bool | None = Field(None, description="On upload: false when the image was already stored.")
    url: str = Field(description="Path devices fetch the image from (HTTP Range, CoAP Block2).")

    @classmethod
    def of(cls, p: Payload, created: bool | None = None) -> PayloadOut:
        return cls(
            sha256=p.sha256,
            size=p.size,
            name=p.name,
            created_at=p.created_at,
            created=created,
            url=f"/p/{p.sha256}",
        )


class PayloadPage(Page[PayloadOut]):
    pass


class SignerIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    public_key_pem: str | None = Field(None, description="PEM SubjectPublicKeyInfo (P-256 or Ed25519).")
    cert_pem: str | None = Field(
        None,
        description="Signer certificate (PEM, optionally followed by the tenant CA) instead of a bare key.",
    )


class SignerOut(BaseModel):
    name: str
    alg: str
    key_id: str = Field(description="SHA-256 of the SubjectPublicKeyInfo DER, hex; the COSE kid.")
    public_key_pem: str
    certified: bool = Field(False, description="Certified by the tenant CA (x5chain signer).")
    hardware_ids: list[str] | None = Field(
        None, description="Developer signer: hardware its builds may target."
    )
    revoked_at: Timestamp | None
    created_at: Timestamp | None

    @classmethod
    def of(cls, sg: Signer) -> SignerOut:
        return cls(
            name=sg.name,
            alg=sg.alg,
            key_id=sg.key_id,
            public_key_pem=sg.public_key_pem,
            certified=sg.cert_pem is not None,
            hardware_ids=list(sg.hardware_ids) if sg.hardware_ids is not None else None,
            revoked_at=sg.revoked_at,
            created_at=sg.created_at,
        )


class SignerPage(Page[SignerOut]):
    pass


class ManifestOut(BaseModel):
    id: int
    digest: str = Field(description="SUIT digest (SHA-256) of the bstr-wrapped manifest: what was signed.")
    sequence: int
    vendor_id: str
    class_id: str
    image_digest: str
    image_size: int
    uris: list[str]
    signer: str | None
    name: str | None
    size: int = Field(description="Envelope size in bytes.")
    created_at: Timestamp | None
    created: bool | None = None

    @classmethod
    def of(cls, m: Manifest, signer: str | None, created: bool | None = None) -> ManifestOut:
        return cls(
            id=m.id,
            digest=m.digest,
            sequence=m.sequence,
            vendor_id=m.vendor_id,
            class_id=m.class_id,
            image_digest=m.image_digest,
            image_size=m.image_size,
            uris=list(m.uris),
            signer=signer,
            name=m.name,
            size=len(m.envelope),
            created_at=m.created_at,
            created=created,
        )


class ManifestPage(Page[ManifestOut]):
    pass


class DeviceIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    vendor_id: str
    class_id: str
    tags: dict[str, StrictStr | BodyInt] = Field(default_factory=dict)
    sequence: StrictInt = 0
    version: str | None = None
    transport: str = "mqtt"
    hardware_id: str | None = None
    secret: str | None = Field(None, description="32 bytes as hex; generated when absent.")
    attest_key_pem: str | None = Field(
        None, description="Public attestation key (PEM), made at provisioning."
    )


class DeviceOut(BaseModel):
    name: str
    vendor_id: str
    class_id: str
    tags: dict[str, Any]
    sequence: int
    version: str | None
    transport: str
    hardware_id: str | None
    online: bool
    last_seen: Timestamp | None
    created_at: Timestamp | None
    firmware_name: str | None = Field(None, description="What the device said it runs (its hello).")
    image_digest: str | None = Field(
        None, description="SHA-256 of the image it said it runs (hello or success): a delta's base."
    )
    decommissioned_at: Timestamp | None = Field(
        None, description="When it was taken out of service (None: in service)."
    )
    attestation_key: bool = Field(False, description="An attestation key is registered.")
    secret: str | None = Field(None, description="Only in the answer to the request that created it.")
    mqtt_username: str | None = Field(None, description="MQTT username, with the password.")
    mqtt_password: str | None = Field(
        None,
        description="MQTT password, only with the secret (or in the answer to a claim); derived from "
        "the secret, see docs/protocol.md.",
    )

    @classmethod
    def of(cls, d: Device, secret: bytes | None = None, tenant: str | None = None) -> DeviceOut:
        """The device; with ``secret`` and ``tenant`` also its secret and MQTT credentials."""
        mqtt = credentials(d.secret, tenant, d.name) if secret is not None and tenant else {}
        return cls(
            name=d.name,
            vendor_id=d.vendor_id,
            class_id=d.class_id,
            tags=dict(d.tags or {}),
            sequence=d.sequence,
            version=d.version,
            transport=d.transport,
            hardware_id=d.hardware_id,
            online=bool(d.online),
            last_seen=d.last_seen,
            created_at=d.created_at,
            firmware_name=d.firmware_name,
            image_digest=d.image_digest,
            decommissioned_at=d.decommissioned_at,
            attestation_key=d.attest_key_pem is not None,
            secret=secret.hex() if secret is not None else None,
            **mqtt,
        )


TagPatch = dict[str, StrictStr | BodyInt | None]
"""A JSON merge patch of tags: a value sets the tag, null removes it."""


class DeviceUpdate(BaseModel):
    """What ``PATCH /devices/{name}`` changes; fields left out stay as they are."""

    model_config = ConfigDict(extra="forbid")
    tags: TagPatch | None = Field(
        None, description='Merged: {"ring": "canary", "old": null} sets ring and removes old.'
    )
    version: str | None = Field(None, description="Installed firmware version label; null clears it.")
    hardware_id: str | None = Field(None, description="Null clears it.")


class RetagIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    filter: str = Field(description='The devices to change, e.g. tag.region == "eu"; "" is every device.')
    tags: TagPatch = Field(description="Merged into each device's tags; null removes a tag.")


class RetagOut(BaseModel):
    matched: int = Field(description="Devices the filter selected (each got the change).")


class DecommissionOut(BaseModel):
    device: DeviceOut
    withdrawn: int = Field(description="Deployments in live campaigns withdrawn (now cancelled).")


def credentials(secret: bytes, tenant: str, device: str) -> dict[str, str]:
    """``mqtt_username`` and ``mqtt_password`` of a device."""
    return {
        "mqtt_username": protocol.broker_username(tenant, device),
        "mqtt_password": protocol.device_password(secret, tenant, device),
    }


class DevicePage(Page[DeviceOut]):
    pass


class ImportedDevice(BaseModel):
    name: str
    secret: str
    mqtt_username: str
    mqtt_password: str

    @classmethod
    def of(cls, name: str, secret: bytes, tenant: str) -> ImportedDevice:
        return cls(name=name, secret=secret.hex(), **credentials(secret, tenant, name))


class ImportOut(BaseModel):
    imported: int
    devices: list[ImportedDevice]


class ImportErrorOut(BaseModel):
    detail: str
    errors: list[str] = Field(description="`line N: problem` for each refused row (capped).")


class DeviceEventOut(BaseModel):
    at: Timestamp
    campaign_id: int
    state: str
    result: int
    detail: str | None

    @classmethod
    def of(cls, e: DeviceEvent) -> DeviceEventOut:
        return cls(at=e.at, campaign_id=e.campaign_id, state=e.state, result=e.result, detail=e.detail)


class DeviceEventPage(Page[DeviceEventOut]):
    pass


class CampaignIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    manifest_id: BodyId
    filter: str = Field("", description="Device filter; empty selects every device.")
    policy: dict[str, Any] = Field(default_factory=dict, description="Rollout policy (phases, rate, …).")
    attestation: bool = Field(False, description="Devices attest before they get an install token.")
    consent: dict[str, Any] | None = Field(
        None, description="Consent campaign: deadline, quorum, options, variants, group, limits, peers."
    )


class CloneIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str | None = Field(None, description='The clone\'s name; default "<name> (copy)".')


class CampaignStartIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    allow_empty: bool = Field(
        False, description="Start even if the filter matches no device (refused with 409 otherwise)."
    )


class CampaignOut(BaseModel):
    id: int
    name: str
    manifest_id: int
    filter: str
    policy: dict[str, Any]
    state: str
    stop_reason: str | None
    attestation: bool = False
    consent: dict[str, Any] | None = None
    consent_stage: str | None = None
    group_decision: str | None = None
    phase: int
    total: int
    created_at: Timestamp | None
    started_at: Timestamp | None
    finished_at: Timestamp | None
    warnings: list[str] = Field(
        default_factory=list,
        description="Create and start: what may be a mistake, e.g. a filter naming a tag no device has.",
    )

    @classmethod
    def of(cls, c: Campaign) -> CampaignOut:
        return cls(
            id=c.id,
            name=c.name,
            manifest_id=c.manifest_id,
            filter=c.filter,
            policy=dict(c.policy or {}),
            state=c.state,
            stop_reason=c.stop_reason,
            attestation=bool(c.attestation),
            consent=c.consent,
            consent_stage=c.consent_stage,
            group_decision=c.group_decision,
            phase=c.phase,
            total=c.total,
            created_at=c.created_at,
            started_at=c.started_at,
            finished_at=c.finished_at,
        )


class CampaignPage(Page[CampaignOut]):
    pass


class FailureCount(BaseModel):
    state: str = Field(
        description="The final state: failed, timed_out, reverted; or skipped, declined, no_answer."
    )
    result: int
    name: str
    count: int


class DeltaBytes(BaseModel):
    delta: int = Field(description="Bytes of patches fetched by devices on a delta manifest")
    full: int = Field(description="Bytes of full images fetched by the other devices")
    without_deltas: int = Field(description="What the same devices would have fetched without patches")
    devices_on_delta: int


class CampaignStats(BaseModel):
    id: int
    name: str
    state: str
    stop_reason: str | None
    note: str | None = Field(
        None, description="Why the campaign is not moving right now (window, rate, schedule)."
    )
    phase: int = Field(description="Current phase: a 0-based index into phase_names.")
    phase_label: str = Field(
        "phase 1", description='The current phase as people read it: "phase 1 (canary)".'
    )
    total: int
    counts: dict[str, int] = Field(description="Deployments per state (every state present).")
    phases: dict[str, dict[str, int]] = Field(description="Per phase: deployments per state.")
    phase_names: list[str] = Field(description="Name of each rollout phase, in order.")
    per_minute: float | None = Field(
        description="Devices completed per minute over the last 5 minutes (cancelled ones excluded)."
    )
    eta_s: float | None = Field(
        description="Seconds until the devices are done (or those up to eta_scope), bounded by the rate "
        "limit and maintenance window; null when it cannot be estimated (eta_note says why)."
    )
    eta_scope: str | None = Field(
        None, description='What the ETA reaches when not the end: "end of phase 1".'
    )
    eta_note: str | None = Field(
        None, description='Why there is no ETA, or what follows it: "waiting for approval of phase 2".'
    )
    failures: list[FailureCount] = Field(
        description="Failed, timed-out and reverted devices by state and result code, most common first."
    )
    skips: list[FailureCount] = Field(
        default_factory=list,
        description="Devices the update was not for (skipped, declined, no answer), by state and result.",
    )
    started_at: Timestamp | None
    finished_at: Timestamp | None
    consent: dict[str, Any] | None = Field(
        None, description="Consent campaigns: stage, invited/accepted/declined/no_answer, group decision."
    )
    bytes: DeltaBytes | None = Field(
        None, description="Delta campaigns: what the devices that fetched their update fetched."
    )


class AccountingRow(BaseModel):
    device: str
    uses: int
    seconds: int
    last_report_at: Timestamp | None
    last_kind: str
    ended: bool = Field(description="A final or removal record arrived: the software's use ended.")
    removed: bool = Field(description="The software was removed again (use or time limit reached).")
    detail: str | None
    records: int


class AccountingOut(BaseModel):
    campaign: int
    devices: list[AccountingRow]
    total_uses: int
    reporting: int
    removed: int


class DeploymentOut(BaseModel):
    device: str
    state: str
    result: int
    result_name: str
    detail: str | None
    phase: int
    attempt: int
    progress: int | None
    notified_at: Timestamp | None
    updated_at: Timestamp | None


class DeploymentPage(Page[DeploymentOut]):
    pass


class CampaignEventOut(BaseModel):
    at: Timestamp
    state: str
    reason: str | None

    @classmethod
    def of(cls, e: CampaignEvent) -> CampaignEventOut:
        return cls(at=e.at, state=e.state, reason=e.reason)


class RetryOut(BaseModel):
    campaign: CampaignOut
    retried: int = Field(description="Failed and timed-out devices given a new attempt.")


class CampaignEventPage(Page[CampaignEventOut]):
    pass
