"""``fwcm demo --signing-service``: the release is signed by the server, inside a throw-away
SoftHSM2 token, after a second key approved it.

The demo plays every part: the operator's root (a local key standing in for the offline
machine), a CI key (operator role) that uploads the image and asks for the release, and a release
manager's key (admin role) that approves it.  Before the approval, the CI key's own approval is
refused and no manifest exists; after it, the manifest is signed in the token and the audit chain
records it all.
"""

from __future__ import annotations

import os
import secrets
import shutil
from pathlib import Path
from typing import Any

from fwcm import keystore, pki
from fwcm import manifest as mf

TOKEN = "fwcm-demo"


def token_settings(workdir: Path) -> dict[str, Any]:
    """A fresh SoftHSM2 token under ``workdir`` and the settings that make the server use it."""
    if shutil.which("softhsm2-util") is None or not Path(keystore.SOFTHSM2_MODULE).exists():
        raise RuntimeError("--signing-service needs SoftHSM2 (Debian package softhsm2)")
    conf = keystore.softhsm_config(workdir / "softhsm")
    os.environ["SOFTHSM2_CONF"] = str(conf)  # read by the module when the server first loads it
    pin = secrets.token_hex(8)
    keystore.init_softhsm_token(conf, TOKEN, pin, secrets.token_hex(8))
    return {"pkcs11_module": keystore.SOFTHSM2_MODULE, "pkcs11_token": TOKEN, "pkcs11_pin": pin}


async def signed_release(
    api: Any, make_api: Any, settings: Any, workdir: Path, info: mf.ManifestInfo
) -> dict[str, Any]:
    """Run the release flow; returns the signed manifest, the root (PEM) devices are provisioned
    with, and what the flow showed (``ok`` only if every step went as the policy says)."""
    root_key = mf.generate_private_key("es256")
    root = pki.make_root(root_key, "fwcm demo operator root")
    (workdir / "root.pem").write_bytes(pki.cert_pem(root))
    settings.pki_root = workdir / "root.pem"

    ca = await api.call("POST", "/signing/ca")
    ca_cert = pki.make_tenant_ca(root_key, root, mf.load_public_key(ca["public_key_pem"].encode()), "demo")
    await api.call("PUT", "/signing/ca/cert", json={"cert_pem": pki.cert_pem(ca_cert).decode()})
    signer = await api.call("POST", "/signing/signers", json={"name": "release"})
    ci = make_api((await api.call("POST", "/keys", json={"name": "ci", "role": "operator"}))["key"])
    manager = make_api(
        (await api.call("POST", "/keys", json={"name": "release-manager", "role": "admin"}))["key"]
    )
    try:
        body = {
            "signer": "release",
            "sequence": info.sequence,
            "vendor_id": str(info.vendor_id),
            "class_id": str(info.class_id),
            "image_digest": info.image_digest.hex(),
            "image_size": info.image_size,
            "uris": list(info.uris),
            "name": "demo-firmware-2.0",
        }
        requested = await ci.call("POST", "/releases", json=body)
        refused = await ci.refusal("POST", f"/releases/{requested['id']}/approve")
        unsigned = (await api.call("GET", "/manifests"))["total"] == 0
        approved = await manager.call("POST", f"/releases/{requested['id']}/approve")
        man = await api.call("GET", f"/manifests/{approved['manifest_id']}")
        audit = await api.call("GET", "/audit/verify")
    finally:
        await ci.close()
        await manager.close()
    flow = {
        "store": signer["store"],
        "release": requested["id"],
        "requested_by": requested["requested_by"],
        "state_before_approval": requested["state"],
        "self_approval_refused": refused,
        "unsigned_before_approval": unsigned,
        "approved_by": [a["key"] for a in approved["approvals"]],
        "state": approved["state"],
        "manifest": man["digest"],
        "audit_chain_ok": audit["ok"],
        "audit_entries": audit["checked"],
    }
    flow["ok"] = (
        flow["store"] == "pkcs11"
        and flow["state_before_approval"] == "pending"
        and refused is not None
        and unsigned
        and flow["approved_by"] == ["release-manager"]
        and flow["state"] == "signed"
        and audit["ok"]
    )
    return {"manifest": man, "root_pem": pki.cert_pem(root), "flow": flow}
