"""LwM2M 1.1 wire formats the server reads from devices (sans-IO).

What fwcm needs of an LwM2M client: its registration (the query of ``POST /rd`` and the CoRE link
format payload naming its object instances) and the values of a few resources of the Device object
(/3) and the Firmware Update object (/5), in whichever content format the client answers a read
or an observation: plain text, LwM2M TLV, SenML JSON or SenML CBOR. Everything is bounded where it
is decoded; garbage is a :class:`~fwcm.protocol.ProtocolError` (reason ``lwm2m``) that says what
is wrong, never an exception of a parser underneath.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from fwcm.protocol.fields import NAME_RE, ProtocolError, loads
from fwcm.protocol.messages import LwState, Result

# Content-Format numbers (IANA CoAP registry; LwM2M 1.1 Core §7.3)
TEXT = 0
LINK_FORMAT = 40
OPAQUE = 42
CBOR = 60
SENML_JSON = 110
SENML_CBOR = 112
LWM2M_TLV = 11542
READABLE_FORMATS = (TEXT, LWM2M_TLV, SENML_JSON, SENML_CBOR)
"""What :func:`decode_values` reads; an absent Content-Format is plain text for one resource."""

# Resources fwcm reads or writes
FW_PACKAGE_URI = (5, 0, 1)
FW_UPDATE = (5, 0, 2)
FW_STATE = (5, 0, 3)
FW_RESULT = (5, 0, 5)
DEVICE_FIRMWARE_VERSION = (3, 0, 3)

MAX_REGISTRATION_BYTES = 2048
"""A registration's link-format payload (a client with every standard object fits in far less)."""
MAX_LINKS = 64
MAX_VALUE_BYTES = 1024
"""A read or notification payload of the few resources fwcm reads."""
MAX_RECORDS = 32
"""TLV entries or SenML records in one payload."""
MAX_TEXT_BYTES = 255
"""A string resource value (/3/0/3 firmware version is clipped further where it is stored)."""
LIFETIME_RANGE = (1, 86400 * 7)
DEFAULT_LIFETIME_S = 86400
ENDPOINT_SEPARATOR = ":"
"""Endpoint names are ``{tenant}:{device}``: neither a tenant slug nor a device name holds a ':'."""
VERSIONS = ("1.0", "1.1", "1.2")
BINDINGS = re.compile(r"\A[UTSNQ]{1,5}\Z")

Path = tuple[int, ...]
Value = int | float | bool | str | bytes


def refuse(message: str) -> ProtocolError:
    return ProtocolError("lwm2m", message)


# -- registration -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Registration:
    """What a ``POST /rd`` (or its update ``POST /rd/{id}``) says about a client."""

    endpoint: str | None
    lifetime: int | None
    version: str | None
    binding: str | None


def parse_query(queries: Iterable[str], *, update: bool = False) -> Registration:
    """The registration parameters of a Uri-Query list; the endpoint name is required unless
    ``update`` (a registration update may only change lifetime and binding)."""
    params: dict[str, str] = {}
    for q in queries:
        if len(params) >= 8 or len(q) > 128:
            raise refuse("too many or too long registration parameters")
        name, _, value = q.partition("=")
        if name in params:
            raise refuse(f"registration parameter {name!r} given twice")
        params[name] = value
    endpoint = params.get("ep")
    if update and endpoint is not None:
        raise refuse("a registration update cannot change the endpoint name")
    if not update and not endpoint:
        raise refuse("registration without an endpoint name (ep)")
    lifetime = None
    if "lt" in params:
        raw = params["lt"]
        if not raw.isdigit() or not LIFETIME_RANGE[0] <= int(raw) <= LIFETIME_RANGE[1]:
            raise refuse(f"lifetime must be {LIFETIME_RANGE[0]}-{LIFETIME_RANGE[1]} s, got {raw[:20]!r}")
        lifetime = int(raw)
    version = params.get("lwm2m")
    if version is not None and version not in VERSIONS:
        raise refuse(f"unsupported LwM2M version {version[:20]!r}")
    binding = params.get("b")
    if binding is not None and not BINDINGS.match(binding):
        raise refuse(f"unknown binding {binding[:20]!r}")
    return Registration(endpoint, lifetime, version, binding)


def split_endpoint(endpoint: str) -> tuple[str, str]:
    """``{tenant}:{device}`` → (tenant, device); anything else is refused."""
    tenant, sep, device = endpoint.partition(ENDPOINT_SEPARATOR)
    if not sep or not NAME_RE.match(tenant) or not NAME_RE.match(device):
        raise refuse(f"endpoint name must be tenant:device, got {endpoint[:80]!r}")
    return tenant, device


def endpoint_name(tenant: str, device: str) -> str:
    return f"{tenant}{ENDPOINT_SEPARATOR}{device}"


_LINK = re.compile(r'<(/[0-9/]*)>((?:;[A-Za-z0-9_.-]+(?:=(?:"[^"]*"|[^;,"]*))?)*)')


def parse_links(payload: bytes) -> frozenset[Path]:
    """The object and object-instance paths a registration's CoRE link format names.

    ``</1/0>,</3/0>,</5/0>`` → {(1, 0), (3, 0), (5, 0)}; an object without instances (``</5>``)
    gives (5,); the root link (``</>;rt="oma.lwm2m"``) and its attributes are skipped.
    """
    if len(payload) > MAX_REGISTRATION_BYTES:
        raise refuse(f"registration payload of {len(payload)} bytes exceeds {MAX_REGISTRATION_BYTES}")
    try:
        text = payload.decode("ascii")
    except UnicodeDecodeError:
        raise refuse("registration payload is not ASCII link format") from None
    paths: set[Path] = set()
    links = [x for x in text.strip().split(",") if x.strip()] if text.strip() else []
    if len(links) > MAX_LINKS:
        raise refuse(f"registration names more than {MAX_LINKS} links")
    for raw in links:
        m = _LINK.fullmatch(raw.strip())
        if m is None:
            raise refuse(f"not a CoRE link: {raw.strip()[:60]!r}")
        segments = [s for s in m.group(1).split("/") if s]
        if not segments:
            continue  # the root link: </>;rt="oma.lwm2m";ct=...
        if len(segments) > 2 or not all(s.isdigit() and int(s) <= 65535 for s in segments):
            raise refuse(f"link {m.group(1)[:40]!r} is not an object or object instance")
        paths.add(tuple(int(s) for s in segments))
    return frozenset(paths)


def has_instance(paths: frozenset[Path], obj: int, instance: int = 0) -> bool:
    return (obj, instance) in paths


# -- resource values ----------------------------------------------------------------------------


def parse_path(text: str) -> Path:
    """``/5/0/3`` → (5, 0, 3): one to four 16-bit numbers."""
    segments = text.strip("/").split("/") if text.strip("/") else []
    if not 1 <= len(segments) <= 4 or not all(s.isdigit() and int(s) <= 65535 for s in segments):
        raise refuse(f"not an LwM2M path: {text[:40]!r}")
    return tuple(int(s) for s in segments)


def decode_values(payload: bytes, content_format: int | None, path: Path) -> dict[Path, Value]:
    """The resource values of a read or notification of ``path``, by full resource path.

    TLV and plain text carry no names of their own: their values are placed under ``path``. A
    single-resource TLV or text value is returned raw (``bytes``) and typed by :func:`as_int` or
    :func:`as_text`; SenML carries its own types.
    """
    if len(payload) > MAX_VALUE_BYTES:
        raise refuse(f"value payload of {len(payload)} bytes exceeds {MAX_VALUE_BYTES}")
    if content_format in (None, TEXT):
        if len(path) != 3:
            raise refuse("plain text carries one resource only")
        return {path: payload}
    if content_format == LWM2M_TLV:
        return dict(_tlv_under(path, payload))
    if content_format == SENML_JSON:
        try:
            records = json.loads(payload)
        except (ValueError, RecursionError) as exc:
            raise refuse(f"not SenML JSON: {exc}") from None
        return _senml(records, _JSON_KEYS, path)
    if content_format == SENML_CBOR:
        return _senml(loads(payload), _CBOR_KEYS, path)
    raise refuse(f"content format {content_format} is not one fwcm reads")


def as_int(value: Value, what: str) -> int:
    """An integer resource value: a SenML number, or the bytes of a TLV or text value."""
    if isinstance(value, bool):
        raise refuse(f"{what} is a boolean, not an integer")
    if isinstance(value, int):
        if abs(value) < 2**63:
            return value
        raise refuse(f"{what} is out of range")
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 2**63:
            return int(value)
        raise refuse(f"{what} is not an integer")
    if isinstance(value, bytes):
        if len(value) <= 20 and (value.isdigit() or (value[:1] == b"-" and value[1:].isdigit())):
            return int(value)
        raise refuse(f"{what} is not an integer: {value[:20]!r}")
    raise refuse(f"{what} is not an integer")


def tlv_int(value: bytes, what: str) -> int:
    """A TLV integer: big-endian two's complement of 1, 2, 4 or 8 bytes."""
    if len(value) not in (1, 2, 4, 8):
        raise refuse(f"{what}: a TLV integer has 1, 2, 4 or 8 bytes, not {len(value)}")
    return int.from_bytes(value, "big", signed=True)


def as_text(value: Value, what: str) -> str:
    """A string resource value (UTF-8, at most :data:`MAX_TEXT_BYTES`)."""
    if isinstance(value, bytes):
        if len(value) > MAX_TEXT_BYTES:
            raise refuse(f"{what} exceeds {MAX_TEXT_BYTES} bytes")
        try:
            value = value.decode()
        except UnicodeDecodeError:
            raise refuse(f"{what} is not UTF-8") from None
    if not isinstance(value, str) or len(value.encode()) > MAX_TEXT_BYTES:
        raise refuse(f"{what} is not a string of at most {MAX_TEXT_BYTES} bytes")
    if any(ord(c) < 0x20 for c in value):
        raise refuse(f"{what} holds control characters")
    return value


def read_int(payload: bytes, content_format: int | None, path: Path) -> int:
    """The integer value of resource ``path`` in a read or notification payload."""
    values = decode_values(payload, content_format, path)
    if path not in values:
        raise refuse(f"payload holds no value for /{'/'.join(map(str, path))}")
    value = values[path]
    what = "/" + "/".join(map(str, path))
    if content_format == LWM2M_TLV:
        return tlv_int(value, what) if isinstance(value, bytes) else as_int(value, what)
    return as_int(value, what)


def read_text(payload: bytes, content_format: int | None, path: Path) -> str:
    """The string value of resource ``path`` in a read or notification payload."""
    values = decode_values(payload, content_format, path)
    if path not in values:
        raise refuse(f"payload holds no value for /{'/'.join(map(str, path))}")
    return as_text(values[path], "/" + "/".join(map(str, path)))


# -- what an observed state and result mean ---------------------------------------------------------


def outcome(state: LwState, result: Result) -> tuple[LwState, Result] | None:
    """What an observed (State, Update Result) pair of /5 says about the update, as the report
    fwcm's deployment rules take; None while nothing happened yet.

    A result of 2 or more is a failure whatever the state (LwM2M leaves a failed install in
    Downloaded, a failed download in Idle): it ends the update. Idle with result 1 is success.
    Otherwise the state is the progress, with the result of an earlier update ignored.
    """
    if result >= Result.NOT_ENOUGH_FLASH:
        return LwState.IDLE, result
    if state == LwState.IDLE:
        return (state, result) if result == Result.SUCCESS else None
    return state, Result.INITIAL


# -- TLV (LwM2M 1.1 Core §7.4.3) ----------------------------------------------------------------

_OBJECT_INSTANCE, _RESOURCE_INSTANCE, _MULTIPLE_RESOURCE, _RESOURCE = 0, 1, 2, 3


def _tlv_entries(data: bytes) -> Iterator[tuple[int, int, bytes]]:
    """(kind, identifier, value) of each TLV entry of ``data``, refusing a truncated one."""
    pos, count = 0, 0
    while pos < len(data):
        count += 1
        if count > MAX_RECORDS:
            raise refuse(f"more than {MAX_RECORDS} TLV entries")
        head = data[pos]
        kind = head >> 6
        id_len = 2 if head & 0x20 else 1
        len_type = (head >> 3) & 0x03
        pos += 1
        if pos + id_len + len_type > len(data):
            raise refuse("truncated TLV header")
        ident = int.from_bytes(data[pos : pos + id_len], "big")
        pos += id_len
        if len_type:
            length = int.from_bytes(data[pos : pos + len_type], "big")
            pos += len_type
        else:
            length = head & 0x07
        if pos + length > len(data):
            raise refuse(f"TLV value of {length} bytes runs past the payload")
        yield kind, ident, data[pos : pos + length]
        pos += length


def _tlv_under(path: Path, data: bytes) -> Iterator[tuple[Path, bytes]]:
    """Resource values of a TLV payload read at ``path`` (an object, instance or resource)."""
    for kind, ident, value in _tlv_entries(data):
        if kind == _OBJECT_INSTANCE:
            if len(path) != 1:
                raise refuse("TLV object instance where none fits")
            yield from _tlv_under((*path, ident), value)
        elif kind == _RESOURCE:
            if len(path) == 3 and ident == path[2]:
                yield path, value
            elif len(path) == 2:
                yield (*path, ident), value
            else:
                raise refuse(f"TLV resource {ident} does not belong under /{'/'.join(map(str, path))}")
        elif kind == _MULTIPLE_RESOURCE:
            if len(path) not in (2, 3):
                raise refuse("TLV multiple resource where none fits")
            resource = (*path[:2], ident)
            for sub_kind, sub_ident, sub in _tlv_entries(value):
                if sub_kind != _RESOURCE_INSTANCE:
                    raise refuse("a TLV multiple resource holds only resource instances")
                yield (*resource, sub_ident), sub
        else:
            raise refuse("TLV resource instance outside a multiple resource")


# -- SenML (RFC 8428) ---------------------------------------------------------------------------

_JSON_KEYS = {"bn": "bn", "n": "n", "v": "v", "vs": "vs", "vb": "vb", "vd": "vd", "bt": "bt", "t": "t"}
_CBOR_KEYS = {-2: "bn", 0: "n", 2: "v", 3: "vs", 4: "vb", 8: "vd", -3: "bt", 6: "t"}
_VALUE_KEYS = ("v", "vs", "vb", "vd")


def _senml(records: Any, keys: Mapping[Any, str], under: Path) -> dict[Path, Value]:
    """Resource values of a SenML pack read at ``under``: base name + name resolved, one value
    per record, every one of them under the path read."""
    if not isinstance(records, list) or not records:
        raise refuse("a SenML pack is a non-empty array of records")
    if len(records) > MAX_RECORDS:
        raise refuse(f"more than {MAX_RECORDS} SenML records")
    out: dict[Path, Value] = {}
    base = ""
    for record in records:
        if not isinstance(record, dict):
            raise refuse("a SenML record is a map")
        fields = {keys[k]: v for k, v in record.items() if k in keys}
        if "bn" in fields:
            if not isinstance(fields["bn"], str) or len(fields["bn"]) > 64:
                raise refuse("SenML base name is not a short string")
            base = fields["bn"]
        name = fields.get("n", "")
        if not isinstance(name, str) or len(name) > 64:
            raise refuse("SenML name is not a short string")
        present = [k for k in _VALUE_KEYS if k in fields]
        if not present:
            continue  # a record that only sets the base name or time
        if len(present) > 1:
            raise refuse("a SenML record holds one value")
        path = parse_path(base + name)
        if path[: len(under)] != under:
            raise refuse(f"SenML record {base + name!r} is not under the path read")
        out[path] = _senml_value(present[0], fields[present[0]])
    return out


def _senml_value(key: str, value: Any) -> Value:
    if key == "v":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise refuse("SenML v is not a number")
        if isinstance(value, float) and not math.isfinite(value):
            raise refuse("SenML v is not finite")
        return value
    if key == "vs":
        if not isinstance(value, str) or len(value.encode()) > MAX_TEXT_BYTES:
            raise refuse(f"SenML vs is not a string of at most {MAX_TEXT_BYTES} bytes")
        return value
    if key == "vb":
        if not isinstance(value, bool):
            raise refuse("SenML vb is not a boolean")
        return value
    if not isinstance(value, bytes | str):  # vd: bytes in CBOR, base64url text in JSON
        raise refuse("SenML vd is not data")
    return value.encode() if isinstance(value, str) else value
