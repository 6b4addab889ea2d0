"""Key stores: file keys and keys inside a real SoftHSM2 token sign manifests and certificates
that verify like locally signed ones; a token key cannot be read out."""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from pathlib import Path

import pytest

from fwcm import keystore, pki
from fwcm.manifest import (
    ManifestInfo,
    build_envelope,
    class_id_for,
    cose,
    decode_envelope,
    generate_private_key,
    key_id,
    verify_envelope,
)

pytestmark = pytest.mark.skipif(
    shutil.which("softhsm2-util") is None or not Path(keystore.SOFTHSM2_MODULE).exists(),
    reason="SoftHSM2 is not installed",
)

PIN = "2468"


@pytest.fixture(scope="module")
def softhsm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One SoftHSM2 configuration per test process: the module reads it once, when first loaded."""
    conf = keystore.softhsm_config(tmp_path_factory.mktemp("softhsm"))
    os.environ["SOFTHSM2_CONF"] = str(conf)
    return conf


@pytest.fixture
def token(softhsm: Path) -> keystore.Pkcs11KeyStore:
    label = f"t-{uuid.uuid4().hex[:12]}"
    keystore.init_softhsm_token(softhsm, label, PIN, "13579")
    return keystore.Pkcs11KeyStore(keystore.SOFTHSM2_MODULE, label, PIN)


def _info(image: bytes) -> ManifestInfo:
    vendor = uuid.uuid5(uuid.NAMESPACE_DNS, "example.com")
    return ManifestInfo(
        sequence=7,
        vendor_id=vendor,
        class_id=class_id_for(vendor, "m1"),
        image_digest=hashlib.sha256(image).digest(),
        image_size=len(image),
        uris=("coap://127.0.0.1/p/x",),
    )


@pytest.mark.parametrize("alg", ["es256", "eddsa"])
def test_token_key_signs_a_manifest_that_verifies(token: keystore.Pkcs11KeyStore, alg: str) -> None:
    handle = token.generate("acme/signer/rel", alg)
    env = decode_envelope(build_envelope(_info(b"fw"), handle))
    assert verify_envelope(env, [handle.public_key()]) == handle.public_key()
    assert env.signatures[0].kid == key_id(handle.public_key())
    assert env.signatures[0].alg_name == ("ESP256" if alg == "es256" else "Ed25519")  # fully specified
    # looked up again by label (a new session): the same key
    again = token.get("acme/signer/rel")
    assert key_id(again.public_key()) == key_id(handle.public_key())
    assert cose.verify(handle.public_key(), cose.alg_for(handle.public_key()), again.cose_sign(b"x"), b"x")


def test_token_key_cannot_be_exported(token: keystore.Pkcs11KeyStore) -> None:
    import pkcs11
    from pkcs11 import Attribute, ObjectClass

    token.generate("acme/ca/ca")
    with token._session() as s:
        (private,) = s.get_objects({Attribute.LABEL: "acme/ca/ca", Attribute.CLASS: ObjectClass.PRIVATE_KEY})
        assert private[Attribute.SENSITIVE] is True
        assert private[Attribute.EXTRACTABLE] is False
        assert private[Attribute.NEVER_EXTRACTABLE] is True
        with pytest.raises(pkcs11.AttributeSensitive):
            private[Attribute.VALUE]
        wrapping = s.generate_key(pkcs11.KeyType.AES, 256, template={Attribute.WRAP: True})
        with pytest.raises(pkcs11.PKCS11Error):
            wrapping.wrap_key(private, mechanism=pkcs11.Mechanism.AES_KEY_WRAP_PAD)
    assert not hasattr(token.get("acme/ca/ca"), "private_bytes")


def test_duplicate_and_unknown_labels_are_refused(token: keystore.Pkcs11KeyStore) -> None:
    token.generate("acme/signer/a")
    with pytest.raises(keystore.KeyStoreError, match="already exists"):
        token.generate("acme/signer/a")
    with pytest.raises(keystore.KeyStoreError):
        token.get("acme/signer/missing")
    with pytest.raises(keystore.KeyStoreError, match="invalid key label"):
        token.generate("../etc/passwd")


def test_certificates_issued_by_a_token_ca_validate(token: keystore.Pkcs11KeyStore) -> None:
    root_key = generate_private_key()
    root = pki.make_root(root_key, "operator root")
    ca_handle = token.generate("acme/ca/ca")
    ca_cert = pki.make_tenant_ca(root_key, root, ca_handle.public_key(), "acme")
    signer = token.generate("acme/signer/dev", "eddsa")
    cert = pki.make_signer(ca_handle, ca_cert, signer.public_key(), "dev", hardware_ids=["hw-1"])
    chain = [pki.cert_der(cert), pki.cert_der(ca_cert)]
    env = decode_envelope(build_envelope(_info(b"fw2"), signer, x5chain=chain))
    info = pki.verify_manifest(env, root)  # what a device checks
    assert (info.tenant, info.name, info.hardware_ids) == ("acme", "dev", ("hw-1",))
    other = generate_private_key()
    with pytest.raises(ValueError, match="does not belong"):
        pki.make_signer(token.generate("acme/ca/other"), ca_cert, other, "x")


def test_file_key_store(tmp_path: Path) -> None:
    store = keystore.FileKeyStore(tmp_path / "keys")
    handle = store.generate("acme/signer/rel")
    env = decode_envelope(build_envelope(_info(b"fw"), store.get("acme/signer/rel")))
    verify_envelope(env, [handle.public_key()])
    (path,) = (tmp_path / "keys").iterdir()
    assert path.stat().st_mode & 0o077 == 0
    with pytest.raises(keystore.KeyStoreError, match="already exists"):
        store.generate("acme/signer/rel")


def test_a_wrong_pin_or_unknown_token_is_a_key_store_error(token: keystore.Pkcs11KeyStore) -> None:
    wrong = keystore.Pkcs11KeyStore(keystore.SOFTHSM2_MODULE, token._token.label, "0000")
    with pytest.raises(keystore.KeyStoreError, match="cannot log in"):
        wrong.generate("acme/signer/x")
    with pytest.raises(keystore.KeyStoreError, match="no-such-token"):
        keystore.Pkcs11KeyStore(keystore.SOFTHSM2_MODULE, "no-such-token", PIN)
