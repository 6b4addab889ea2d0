"""What the demo's devices trust: a bare signer key, or the operator root → tenant CA → signer
chain they are provisioned to check (attestation, developer builds, revocation)."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def spki_b64(key: Any) -> str:
    from cryptography.hazmat.primitives import serialization

    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(der).decode()


@dataclass
class Trust:
    """The demo's signing set-up: a bare key, or (attestation, dev-build, revoked) the operator
    root → tenant CA → signer chain that devices are provisioned to check."""

    root_pem: bytes | None = None
    ca_pem: bytes = b""
    signer_cert_pem: bytes = b""
    x5chain: list[bytes] | None = None
    hardware_ids: tuple[str, ...] | None = None

    @classmethod
    def make(cls, attestation: bool, faults: str, devices: int, workdir: Path, signing_key: Any) -> Trust:
        from fwcm import manifest as mf
        from fwcm import pki

        if not (attestation or faults in ("dev-build", "revoked", "rogue")):
            return cls()
        root_key = mf.generate_private_key("es256")
        root = pki.make_root(root_key, "fwcm demo operator root")
        ca_key = mf.generate_private_key("es256")
        ca = pki.make_tenant_ca(root_key, root, mf.public_of(ca_key), "demo")
        hardware = None
        if faults == "dev-build":
            hardware = tuple(f"hw-{i:05d}" for i in range(devices) if i % 2 == 0)
        signer = pki.make_signer(
            ca_key,
            ca,
            mf.public_of(signing_key),
            "release",
            hardware_ids=list(hardware) if hardware else None,
        )
        (workdir / "root.pem").write_bytes(pki.cert_pem(root))
        return cls(
            root_pem=pki.cert_pem(root),
            ca_pem=pki.cert_pem(ca),
            signer_cert_pem=pki.cert_pem(signer),
            x5chain=[pki.cert_der(signer), pki.cert_der(ca)],
            hardware_ids=hardware,
        )

    def signer_body(self, pub: bytes) -> dict[str, str]:
        if self.root_pem is None:
            return {"public_key_pem": pub.decode()}
        return {"cert_pem": self.signer_cert_pem.decode()}
