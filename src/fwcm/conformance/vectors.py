"""Test vectors for firmware authors: ``python -m fwcm.conformance.vectors --write docs/vectors``.

Every vector is made by fwcm's own code from fixed keys, secrets and times, so the files are
byte-for-byte reproducible and a test regenerates them to prove ``docs/vectors`` matches the code.
ECDSA signatures are randomized in general; here they are made deterministically (RFC 6979) so the
files reproduce, and any valid signature verifies the same way. Each vector says what a receiver
must do with it: ``"expect": "ok"`` or the refusal (``"refused"``: the result code a device reports
or the reason the server counts).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import cbor2
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from fwcm import attestation, manifest, protocol
from fwcm.manifest import cose
from fwcm.manifest.encode import canonical_cbor
from fwcm.protocol import LwState, Notice, NoticeKind, Report, Result

TENANT = "acme"
DEVICE = "dev-1"
SECRET = bytes(range(32))
"""The device secret of every message vector: bytes 0 to 31."""
ISSUED = 1_767_225_600
"""2026-01-01T00:00:00Z: every time in the vectors."""
VENDOR = manifest.vendor_id_for_domain("example.com")
CLASS = manifest.class_id_for(VENDOR, "sensor-v1")
OTHER_CLASS = manifest.class_id_for(VENDOR, "sensor-v2")
IMAGE = bytes(range(256)) * 4
"""The 1024-byte image the manifest vectors describe."""
URI = "https://updates.example.com/p/" + hashlib.sha256(IMAGE).hexdigest()
INSTALLED_SEQUENCE = 2
"""The sequence the device of the manifest vectors runs."""


def _seed(label: str) -> bytes:
    return hashlib.sha256(f"fwcm test vector key: {label}".encode()).digest()


def ed25519_key(label: str) -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.from_private_bytes(_seed(label))


def p256_key(label: str) -> ec.EllipticCurvePrivateKey:
    order = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
    return ec.derive_private_key(int.from_bytes(_seed(label), "big") % (order - 1) + 1, ec.SECP256R1())


class Rfc6979:
    """A P-256 key that signs deterministically (RFC 6979), through the seam fwcm has for keys it
    does not read (:class:`fwcm.manifest.cose.HeldKey`)."""

    def __init__(self, key: ec.EllipticCurvePrivateKey) -> None:
        self.key = key

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self.key.public_key()

    def cose_sign(self, data: bytes) -> bytes:
        r, s = decode_dss_signature(
            self.key.sign(data, ec.ECDSA(hashes.SHA256(), deterministic_signing=True))
        )
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def diag(obj: Any) -> str:
    """CBOR diagnostic notation (RFC 8949 section 8) of a decoded item."""
    if isinstance(obj, bool):
        return "true" if obj else "false"
    if obj is None:
        return "null"
    if isinstance(obj, int):
        return str(obj)
    if isinstance(obj, str):
        return json.dumps(obj, ensure_ascii=False)
    if isinstance(obj, bytes):
        return f"h'{obj.hex()}'"
    if isinstance(obj, list | tuple):
        return "[" + ", ".join(diag(x) for x in obj) + "]"
    if isinstance(obj, Mapping):
        return "{" + ", ".join(f"{diag(k)}: {diag(v)}" for k, v in obj.items()) + "}"
    if isinstance(obj, cbor2.CBORTag):
        return f"{obj.tag}({diag(obj.value)})"
    raise TypeError(f"no diagnostic notation for {type(obj).__name__}")


def _public(key: Any) -> dict[str, str]:
    public = manifest.public_of(key)
    return {
        "public_pem": manifest.public_key_pem(public).decode(),
        "kid": manifest.key_id(public).hex(),
    }


# -- keys ------------------------------------------------------------------------------------


def keys() -> dict[str, Any]:
    return {
        "description": "The fixed keys and identity every other vector file uses. Private keys are "
        "published: they are test keys, never trust them.",
        "device": {
            "tenant": TENANT,
            "device": DEVICE,
            "secret": SECRET.hex(),
            "mqtt_username": protocol.broker_username(TENANT, DEVICE),
            "mqtt_password": protocol.device_password(SECRET, TENANT, DEVICE),
            "vendor_id": str(VENDOR),
            "class_id": str(CLASS),
            "vendor_id_rule": "uuid5(NAMESPACE_DNS, 'example.com')",
            "class_id_rule": "uuid5(vendor_id, 'sensor-v1')",
        },
        "keys": {
            label: {"alg": alg, "private_pem": manifest.private_key_pem(key).decode(), **_public(key)}
            for label, alg, key in (
                ("manifest-p256", "ES256/ESP256", p256_key("manifest-p256")),
                ("manifest-ed25519", "EdDSA/Ed25519", ed25519_key("manifest-ed25519")),
                ("attestation-p256", "ES256", p256_key("attestation-p256")),
                ("attestation-ed25519", "EdDSA", ed25519_key("attestation-ed25519")),
                ("server-ed25519", "EdDSA", ed25519_key("server-ed25519")),
            )
        },
    }


# -- messages --------------------------------------------------------------------------------


def _message(name: str, description: str, data: bytes, expect: str = "ok") -> dict[str, Any]:
    tagged = cbor2.loads(data)
    payload = tagged.value[2] if isinstance(tagged, cbor2.CBORTag) else b""
    return {
        "name": name,
        "description": description,
        "expect": expect,
        "hex": data.hex(),
        "frame": diag(tagged),
        "payload": diag(cbor2.loads(payload)) if payload else "",
    }


def messages() -> dict[str, Any]:
    envelope = manifest_envelope(ed25519_key("manifest-ed25519"))
    update = Notice(NoticeKind.UPDATE, DEVICE, 7, 1, ISSUED, envelope=envelope)
    cancel = Notice(NoticeKind.CANCEL, DEVICE, 7, 1, ISSUED + 5)
    attested = Notice(NoticeKind.UPDATE, DEVICE, 8, 1, ISSUED, envelope=envelope, nonce=bytes(range(16)))
    hello = Report(
        DEVICE,
        0,
        0,
        1,
        LwState.IDLE,
        Result.INITIAL,
        installed_sequence=1,
        extra={
            protocol.REPORT_FIRMWARE_NAME: "sensor-fw",
            protocol.REPORT_FIRMWARE_VERSION: "1.0.1",
            protocol.REPORT_IMAGE_DIGEST: hashlib.sha256(b"factory image").digest(),
        },
    )
    downloading = Report(DEVICE, 7, 1, 1, LwState.DOWNLOADING, Result.INITIAL, progress=0)
    success = Report(
        DEVICE,
        7,
        1,
        4,
        LwState.IDLE,
        Result.SUCCESS,
        installed_sequence=3,
        extra={protocol.REPORT_IMAGE_DIGEST: hashlib.sha256(IMAGE).digest()},
    )
    failure = Report(
        DEVICE,
        7,
        1,
        2,
        LwState.IDLE,
        Result.INTEGRITY_FAILURE,
        detail="image digest mismatch",
        installed_sequence=2,
    )
    good = protocol.encode_report(SECRET, downloading)
    bad_mac = good[:-1] + bytes([good[-1] ^ 1])
    under_other_kid = protocol.seal(
        SECRET, DEVICE, Report("dev-2", 7, 1, 1, LwState.IDLE, Result.INITIAL).to_map()
    )
    oversized = protocol.encode_report(
        SECRET, Report(DEVICE, 7, 1, 3, LwState.IDLE, Result.INITIAL, extra={20: b"\0" * 1024})
    )
    long_detail = protocol.seal(
        SECRET, DEVICE, {**Report(DEVICE, 7, 1, 3, LwState.IDLE, Result.UPDATE_FAILED).to_map(), 8: "x" * 201}
    )
    return {
        "description": f"Sealed notices and reports (COSE_Mac0, HMAC 256/64) of device {DEVICE!r} with "
        f"secret {SECRET.hex()}. 'frame' and 'payload' are CBOR diagnostic notation.",
        "notices": [
            _message(
                "update",
                "update notice, campaign 7 attempt 1, carrying manifests.json 'good-ed25519'",
                protocol.encode_notice(SECRET, update),
            ),
            _message("cancel", "cancel notice for the same attempt", protocol.encode_notice(SECRET, cancel)),
            _message(
                "update-attested",
                "update notice of an attested campaign: a 16-byte nonce (key 7)",
                protocol.encode_notice(SECRET, attested),
            ),
            _message(
                "update-bad-mac",
                "the update notice with its tag's last bit flipped: ignore it",
                _flip_last(protocol.encode_notice(SECRET, update)),
                "refused: mac",
            ),
            _message(
                "update-other-secret",
                "an update notice sealed with another device's secret: ignore it",
                protocol.encode_notice(hashlib.sha256(b"another secret").digest(), update),
                "refused: mac",
            ),
        ],
        "reports": [
            _message(
                "hello",
                "hello (campaign 0) on connecting: sequence, firmware name and version, image digest",
                protocol.encode_report(SECRET, hello),
            ),
            _message("downloading", "Downloading, progress 0", good),
            _message(
                "success",
                "Idle/1 success, running sequence 3, with the new image's SHA-256 (key 15)",
                protocol.encode_report(SECRET, success),
            ),
            _message("integrity-failure", "Idle/5 with a detail", protocol.encode_report(SECRET, failure)),
            _message(
                "bad-mac", "the Downloading report with its tag's last bit flipped", bad_mac, "refused: mac"
            ),
            _message(
                "kid-mismatch",
                "a body naming dev-2 under kid dev-1, MAC'd with dev-1's secret",
                under_other_kid,
                "refused: forbidden",
            ),
            _message(
                "oversized",
                f"a report larger than {protocol.MAX_REPORT_BYTES} bytes",
                oversized,
                "refused: oversized",
            ),
            _message("detail-too-long", "a detail (key 8) of 201 bytes", long_detail, "refused: shape"),
        ],
    }


def _flip_last(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 1])


# -- manifests -------------------------------------------------------------------------------


def manifest_info(*, sequence: int = 3, class_id: uuid.UUID = CLASS) -> manifest.ManifestInfo:
    return manifest.ManifestInfo(
        sequence=sequence,
        vendor_id=VENDOR,
        class_id=class_id,
        image_digest=hashlib.sha256(IMAGE).digest(),
        image_size=len(IMAGE),
        uris=(URI,),
    )


def manifest_envelope(key: Any, *, alg: int | None = None, **kw: Any) -> bytes:
    signer = Rfc6979(key) if isinstance(key, ec.EllipticCurvePrivateKey) else key
    return manifest.build_envelope(manifest_info(**kw), signer, alg=alg)


def _unknown_alg(key: ed25519.Ed25519PrivateKey) -> bytes:
    """A well-signed envelope whose protected header names ES384 (-35), outside the profile."""
    info = manifest_info()
    good = cbor2.loads(manifest.build_envelope(info, key))
    auth = cbor2.loads(good.value[2])
    protected = canonical_cbor({cose.HDR_ALG: -35})
    signature = cose.sign(key, cose.to_be_signed(protected, auth[0]))
    sign1 = cbor2.CBORTag(
        cose.COSE_SIGN1_TAG, [protected, {cose.HDR_KID: manifest.key_id(key)}, None, signature]
    )
    return canonical_cbor(
        cbor2.CBORTag(107, {**good.value, 2: canonical_cbor([auth[0], canonical_cbor(sign1)])})
    )


def _manifest(
    name: str, description: str, envelope: bytes, signer: str, expect: str, served: bytes = IMAGE
) -> dict[str, Any]:
    return {
        "name": name,
        "description": description,
        "trusted_key": signer,
        "expect": expect,
        "envelope": envelope.hex(),
        "served_image_sha256": hashlib.sha256(served).hexdigest(),
        "served_image": served.hex() if served != IMAGE else "IMAGE",
    }


def manifests() -> dict[str, Any]:
    p256, ed = p256_key("manifest-p256"), ed25519_key("manifest-ed25519")
    good_ed = manifest_envelope(ed)
    sig = manifest.decode_envelope(good_ed).signatures[0].signature
    tampered = IMAGE[:512] + bytes([IMAGE[512] ^ 0xFF]) + IMAGE[513:]
    return {
        "description": "SUIT envelopes (tag 107) for a device of vendor "
        f"{VENDOR} class {CLASS} running sequence {INSTALLED_SEQUENCE}; the image is bytes 0..255 "
        "repeated 4 times (1024 bytes, 'IMAGE'). 'trusted_key' names the key of keys.json the device "
        "trusts; 'expect' is ok or the result the device reports (Idle/N). ES256/ESP256 signatures "
        "here are RFC 6979 deterministic; any valid ECDSA signature must be accepted the same way.",
        "image": IMAGE.hex(),
        "image_sha256": hashlib.sha256(IMAGE).hexdigest(),
        "installed_sequence": INSTALLED_SEQUENCE,
        "vectors": [
            _manifest(
                "good-esp256",
                "P-256, alg ESP256 (-9), sequence 3",
                manifest_envelope(p256),
                "manifest-p256",
                "ok",
            ),
            _manifest(
                "good-es256",
                "P-256, alg ES256 (-7), sequence 3",
                manifest_envelope(p256, alg=cose.ALG_ES256),
                "manifest-p256",
                "ok",
            ),
            _manifest(
                "good-ed25519", "Ed25519, alg Ed25519 (-19), sequence 3", good_ed, "manifest-ed25519", "ok"
            ),
            _manifest(
                "good-eddsa",
                "Ed25519, alg EdDSA (-8), sequence 3",
                manifest_envelope(ed, alg=cose.ALG_EDDSA),
                "manifest-ed25519",
                "ok",
            ),
            _manifest(
                "bad-signature",
                "good-ed25519 with the signature's last bit flipped",
                good_ed.replace(sig, sig[:-1] + bytes([sig[-1] ^ 1])),
                "manifest-ed25519",
                "refused: 12",
            ),
            _manifest(
                "unknown-key",
                "signed by a key the device does not trust (manifest-p256)",
                manifest_envelope(p256),
                "manifest-ed25519",
                "refused: 12",
            ),
            _manifest(
                "unknown-algorithm",
                "signed well, but the protected header names ES384 (-35)",
                _unknown_alg(ed),
                "manifest-ed25519",
                "refused: 6",
            ),
            _manifest(
                "wrong-class",
                "for class uuid5(vendor, 'sensor-v2')",
                manifest_envelope(ed, class_id=OTHER_CLASS),
                "manifest-ed25519",
                "refused: 13",
            ),
            _manifest(
                "rollback",
                "sequence 1, older than the installed 2",
                manifest_envelope(ed, sequence=1),
                "manifest-ed25519",
                "refused: 14",
            ),
            _manifest(
                "up-to-date",
                "sequence 2, the installed one",
                manifest_envelope(ed, sequence=2),
                "manifest-ed25519",
                "refused: 15",
            ),
            _manifest(
                "wrong-digest",
                "good-ed25519, but the bytes served differ from the image in byte 512",
                good_ed,
                "manifest-ed25519",
                "refused: 5",
                served=tampered,
            ),
        ],
    }


# -- attestation -----------------------------------------------------------------------------


def _evidence(key: Any, ev: attestation.Evidence) -> bytes:
    """``attestation.make_evidence``, with a deterministic signature for P-256 keys."""
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return attestation.make_evidence(key, ev)
    protected = cbor2.dumps({cose.HDR_ALG: cose.alg_for(key)})
    payload = cbor2.dumps(ev.to_claims(), canonical=True)
    signature = cose.sign(Rfc6979(key), cose.to_be_signed(protected, payload))
    unprotected = {cose.HDR_KID: manifest.key_id(key)}
    return cbor2.dumps(cbor2.CBORTag(cose.COSE_SIGN1_TAG, [protected, unprotected, payload, signature]))


def attestation_vectors() -> dict[str, Any]:
    server = ed25519_key("server-ed25519")
    nonce = bytes(range(16))
    envelope = manifest_envelope(ed25519_key("manifest-ed25519"))
    manifest_digest = manifest.decode_envelope(envelope).digest
    running = hashlib.sha256(b"factory image").digest()
    ev = attestation.Evidence(nonce, DEVICE, running, manifest_digest)
    grant = attestation.Grant(
        TENANT,
        DEVICE,
        manifest_digest,
        hashlib.sha256(IMAGE).digest(),
        8,
        expires=ISSUED + attestation.TOKEN_TTL_S,
    )
    token_key = attestation.token_key(server)
    token = attestation.issue_token(token_key, grant)
    installed = attestation.Grant(
        TENANT, DEVICE, manifest_digest, grant.image_digest, 8, sequence=3, installed_at=ISSUED + 60
    )

    def evidence(
        name: str, description: str, key_label: str, e: attestation.Evidence, expect: str = "ok"
    ) -> dict[str, Any]:
        key = ed25519_key(key_label) if "ed25519" in key_label else p256_key(key_label)
        data = _evidence(key, e)
        return {
            "name": name,
            "description": description,
            "key": key_label,
            "expect": expect,
            "hex": data.hex(),
            "diag": diag(cbor2.loads(data)),
        }

    return {
        "description": "Attestation evidence (COSE_Sign1 tag 18 by the device's attestation key), install "
        "tokens (36 bytes MAC'd by the server) and installation credentials (COSE_Sign1 by the "
        f"server key). Nonce {nonce.hex()}, manifest digest of manifests.json 'good-ed25519' "
        f"{manifest_digest.hex()}, running image SHA-256('factory image'), campaign 8, now {ISSUED}.",
        "nonce": nonce.hex(),
        "manifest_digest": manifest_digest.hex(),
        "running_image_sha256": running.hex(),
        "now": ISSUED,
        "evidence": [
            evidence("evidence-ed25519", "EdDSA (-8) evidence", "attestation-ed25519", ev),
            evidence("evidence-p256", "ES256 (-7) evidence (RFC 6979 signature)", "attestation-p256", ev),
            evidence(
                "evidence-wrong-device",
                "names dev-2",
                "attestation-ed25519",
                attestation.Evidence(nonce, "dev-2", running, manifest_digest),
                "refused: wrong_device",
            ),
            evidence(
                "evidence-stale-nonce",
                "answers another nonce",
                "attestation-ed25519",
                attestation.Evidence(bytes(16), DEVICE, running, manifest_digest),
                "refused: stale_nonce",
            ),
            evidence(
                "evidence-wrong-manifest",
                "for another manifest",
                "attestation-ed25519",
                attestation.Evidence(nonce, DEVICE, running, bytes(32)),
                "refused: wrong_manifest",
            ),
            evidence(
                "evidence-unregistered-key",
                "signed by attestation-p256 while attestation-ed25519 is registered",
                "attestation-p256",
                ev,
                "refused: bad_signature",
            ),
        ],
        "tokens": [
            {
                "name": "token",
                "description": f"install token for {TENANT}/{DEVICE}, the image of good-ed25519, campaign 8, "
                f"expiring at {grant.expires}; the token key is HMAC-SHA-256(PKCS#8 DER of server-ed25519, "
                "'fwcm install token key v1')",
                "token_key": token_key.hex(),
                "hex": token.hex(),
                "query": f"d={TENANT}/{DEVICE}&t={attestation.b64(token)}",
                "expect": "ok",
            },
            {
                "name": "token-expired",
                "description": "the same token presented at its expiry time",
                "hex": token.hex(),
                "now": grant.expires,
                "expect": "refused: expired",
            },
            {
                "name": "token-bad-tag",
                "description": "the token with its tag's last bit flipped",
                "hex": _flip_last(token).hex(),
                "expect": "refused: bad_signature",
            },
        ],
        "credentials": [
            {
                "name": "credential",
                "description": "installation credential for campaign 8: sequence 3 installed at "
                f"{installed.installed_at}, signed by server-ed25519",
                "hex": (cred := attestation.issue_credential(server, installed)).hex(),
                "diag": diag(cbor2.loads(cred)),
                "expect": "ok",
            },
        ],
    }


# -- writing ---------------------------------------------------------------------------------


def generate() -> dict[str, str]:
    """Every vector file: name → its text."""
    files = {
        "keys.json": keys(),
        "messages.json": messages(),
        "manifests.json": manifests(),
        "attestation.json": attestation_vectors(),
    }
    return {name: json.dumps(body, indent=2, ensure_ascii=False) + "\n" for name, body in files.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fwcm.conformance.vectors", description=__doc__)
    parser.add_argument("--write", type=Path, metavar="DIR", help="write the vector files into DIR")
    parser.add_argument(
        "--check", type=Path, metavar="DIR", help="exit 1 unless DIR holds exactly these files"
    )
    args = parser.parse_args(argv)
    files = generate()
    if args.write is not None:
        args.write.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (args.write / name).write_text(text)
    if args.check is not None:
        stale = [
            n
            for n, text in files.items()
            if not (args.check / n).is_file() or (args.check / n).read_text() != text
        ]
        if stale:
            print(f"out of date: {', '.join(stale)}", file=sys.stderr)
            return 1
    if args.write is None and args.check is None:
        sys.stdout.write(files["messages.json"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
