"""Wire messages shared by the server and devices (sans-IO).

Every message between a device and the server is a CBOR map with small integer keys, wrapped in a
COSE_Mac0 (tag 17, HMAC 256/64) keyed with the device's own secret.  The MAC binds a message to one
device: a device that publishes on another device's topic, or replays a report under another name,
fails verification.  ``docs/protocol.md`` holds the CDDL.

The package's face: each concern has its module, and every public name is handed on from here.

* :mod:`~fwcm.protocol.fields` — bounds of every field and the bounded-decoding helpers
* :mod:`~fwcm.protocol.framing` — COSE_Mac0 seal and unseal
* :mod:`~fwcm.protocol.messages` — the notice and the report, their key constants and codecs
* :mod:`~fwcm.protocol.values` — the nested maps of notices and reports as value types
* :mod:`~fwcm.protocol.topics` — MQTT topics, CoAP paths, the payload path
* :mod:`~fwcm.protocol.credentials` — a device's broker and observation password
"""

from fwcm.protocol.credentials import DEVICE_PASSWORD_LABEL, broker_username, device_password
from fwcm.protocol.fields import (
    ATTEMPT_MAX,
    DETAIL_BYTES,
    FIRMWARE_NAME_BYTES,
    FIRMWARE_VERSION_BYTES,
    KEY_ID_BYTES,
    MAX_OPTION_VALUES,
    MAX_OPTIONS,
    NAME_RE,
    NONCE_BYTES,
    NOTICE_TEXT_BYTES,
    OPTION_BYTES,
    SIGNED_OBJECT_BYTES,
    UINT63_MAX,
    ProtocolError,
)
from fwcm.protocol.framing import (
    COSE_MAC0_TAG,
    HMAC_256_64,
    MAX_NOTICE_BYTES,
    MAX_REPORT_BYTES,
    Sealed,
    seal,
    unseal,
)
from fwcm.protocol.messages import (
    NOTICE_CREDENTIAL,
    NOTICE_INVITATION,
    NOTICE_LIMITS,
    NOTICE_PREPARE,
    NOTICE_REASON,
    NOTICE_TOKEN,
    REPORT_ACCOUNTING,
    REPORT_ANSWER,
    REPORT_EVIDENCE,
    REPORT_FIRMWARE_NAME,
    REPORT_FIRMWARE_VERSION,
    SKIP_RESULTS,
    TRANSIENT_RESULTS,
    LwState,
    Notice,
    NoticeKind,
    Report,
    Result,
    decode_notice,
    decode_report,
    encode_notice,
    encode_report,
)
from fwcm.protocol.topics import (
    PRESENCE_SUBSCRIPTION,
    PROTOCOL_VERSION,
    STATUS_SUBSCRIPTION,
    TOPIC_PREFIX,
    coap_notice_path,
    coap_status_path,
    notice_topic,
    parse_device_topic,
    payload_path,
    presence_topic,
    status_topic,
)
from fwcm.protocol.values import ACCOUNTING_KINDS, Accounting, Answer, Invitation, UsageLimits

__all__ = [
    "ACCOUNTING_KINDS",
    "ATTEMPT_MAX",
    "COSE_MAC0_TAG",
    "DETAIL_BYTES",
    "DEVICE_PASSWORD_LABEL",
    "FIRMWARE_NAME_BYTES",
    "FIRMWARE_VERSION_BYTES",
    "HMAC_256_64",
    "KEY_ID_BYTES",
    "MAX_NOTICE_BYTES",
    "MAX_OPTIONS",
    "MAX_OPTION_VALUES",
    "MAX_REPORT_BYTES",
    "NAME_RE",
    "NONCE_BYTES",
    "NOTICE_CREDENTIAL",
    "NOTICE_INVITATION",
    "NOTICE_LIMITS",
    "NOTICE_PREPARE",
    "NOTICE_REASON",
    "NOTICE_TEXT_BYTES",
    "NOTICE_TOKEN",
    "OPTION_BYTES",
    "PRESENCE_SUBSCRIPTION",
    "PROTOCOL_VERSION",
    "REPORT_ACCOUNTING",
    "REPORT_ANSWER",
    "REPORT_EVIDENCE",
    "REPORT_FIRMWARE_NAME",
    "REPORT_FIRMWARE_VERSION",
    "SIGNED_OBJECT_BYTES",
    "SKIP_RESULTS",
    "STATUS_SUBSCRIPTION",
    "TOPIC_PREFIX",
    "TRANSIENT_RESULTS",
    "UINT63_MAX",
    "Accounting",
    "Answer",
    "Invitation",
    "LwState",
    "Notice",
    "NoticeKind",
    "ProtocolError",
    "Report",
    "Result",
    "Sealed",
    "UsageLimits",
    "broker_username",
    "coap_notice_path",
    "coap_status_path",
    "decode_notice",
    "decode_report",
    "device_password",
    "encode_notice",
    "encode_report",
    "notice_topic",
    "parse_device_topic",
    "payload_path",
    "presence_topic",
    "seal",
    "status_topic",
    "unseal",
]
