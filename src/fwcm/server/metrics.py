"""Prometheus metrics of the server (exposed at ``/metrics``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(namespace="fwcm", registry=REGISTRY)  # the replica's own memory and CPU, for sizing

NOTICES_SENT = Counter(
    "fwcm_notices_sent", "Notices sent to devices", ["transport", "kind"], registry=REGISTRY
)
PAYLOAD_BYTES = Counter(
    "fwcm_payload_bytes_served",
    "Payload bytes sent to devices from memory: server-made patches (delta) and images (full)",
    ["transport", "kind"],
    registry=REGISTRY,
)
REPORTS_INGESTED = Counter(
    "fwcm_reports_ingested", "Status reports made durable", ["transport"], registry=REGISTRY
)
REJECTED = Counter(
    "fwcm_messages_rejected", "Device messages refused", ["transport", "reason"], registry=REGISTRY
)
INGEST_LATENCY = Histogram(
    "fwcm_ingest_latency_seconds",
    "From the arrival of the oldest report of a batch to the batch's commit",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=REGISTRY,
)
BATCH_SIZE = Histogram(
    "fwcm_ingest_batch_size",
    "Reports per ingest transaction",
    buckets=(1, 10, 50, 100, 250, 500, 1000, 2000),
    registry=REGISTRY,
)
LAST_COMMIT = Gauge(
    "fwcm_ingest_last_commit_timestamp_seconds",
    "Unix time of the newest committed ingest batch (alert when it stalls while reports arrive)",
    registry=REGISTRY,
)
CAMPAIGNS = Gauge("fwcm_campaigns", "Campaigns by state", ["state"], registry=REGISTRY)
ATTESTATIONS = Counter(
    "fwcm_attestations_total", "Attestation evidence judged, by outcome", ["outcome"], registry=REGISTRY
)
TOKENS_REFUSED = Counter(
    "fwcm_install_tokens_refused_total",
    "Payload fetches refused for a missing or invalid install token",
    ["transport", "reason"],
    registry=REGISTRY,
)
ENGINE_CAMPAIGN_ERRORS = Counter(
    "fwcm_engine_campaign_errors",
    "Engine steps of one campaign that raised, by error type (the campaign is retried with backoff)",
    ["error"],
    registry=REGISTRY,
)
ENGINE_CAMPAIGNS_FAILING = Gauge(
    "fwcm_engine_campaigns_failing",
    "Campaigns the engine cannot advance right now (their note says why)",
    registry=REGISTRY,
)
HTTP_CLOSED = Counter(
    "fwcm_http_connections_closed",
    "HTTP connections closed or refused to protect the others: head_timeout, body_timeout, stalled, "
    "evicted, refused",
    ["reason"],
    registry=REGISTRY,
)
QUARANTINED = Counter(
    "fwcm_messages_quarantined",
    "Device messages that passed every check but failed to apply, kept as dead letters",
    ["transport", "reason"],
    registry=REGISTRY,
)
AUTH_FAILURES = Counter(
    "fwcm_api_auth_failures",
    "API requests refused for their key: unknown, expired or revoked",
    ["reason"],
    registry=REGISTRY,
)
AUDIT_FAILURES = Counter(
    "fwcm_audit_write_failures",
    "Mutating API requests whose audit entry could not be written (the request itself was answered)",
    registry=REGISTRY,
)
