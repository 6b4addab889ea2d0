"""Where the server keeps the private keys it signs with: a key-store seam, two implementations.

* :class:`FileKeyStore`: one PEM file per key under a directory (small setups, tests of logic);
* :class:`Pkcs11KeyStore`: keys generated inside a PKCS#11 token (an HSM, a cloud KMS's PKCS#11
  module, SoftHSM2), marked sensitive and non-extractable, so the private half never leaves it;
  every signature is made by the token.

Both hand out :class:`KeyHandle` objects: the public key and a ``cose_sign`` that returns a raw
COSE signature (ECDSA P-256 ``r || s``, or Ed25519's 64 bytes), which is all the manifest codec
(:func:`fwcm.manifest.build_envelope`) and certificate issuing (:func:`fwcm.pki.sign_with`) need.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import load_der_public_key

from fwcm.manifest import PublicKey, cose, generate_private_key, load_private_key, private_key_pem, public_of
from fwcm.manifest.keys import ALGS

log = logging.getLogger(__name__)

LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,99}$")
"""Key labels: ``<tenant>/<purpose>/<name>``, safe as a file name part and as a CKA_LABEL."""
ED25519_OID = "1.3.101.112"


class KeyStoreError(Exception):
    """The key store cannot do what was asked (unknown key, duplicate label, token problem)."""


@runtime_checkable
class KeyHandle(Protocol):
    """A private key the caller may sign with but never read."""

    label: str

    def public_key(self) -> PublicKey: ...

    def cose_sign(self, data: bytes) -> bytes:
        """The raw COSE signature of ``data`` (ES256 ``r || s`` or EdDSA)."""
        ...


class KeyStore(Protocol):
    kind: str
    """``file`` or ``pkcs11``: recorded with each key so a key is looked up where it was made."""

    def generate(self, label: str, alg: str = "es256") -> KeyHandle: ...

    def get(self, label: str) -> KeyHandle: ...


def check_label(label: str) -> str:
    if not LABEL_RE.match(label) or ".." in label:
        raise KeyStoreError(f"invalid key label {label!r}")
    return label


def _check_alg(alg: str) -> str:
    if alg not in ALGS:
        raise KeyStoreError(f"unsupported key algorithm {alg!r} (use one of: {', '.join(ALGS)})")
    return alg


# --- file keys -------------------------------------------------------------------------------------


class FileKey:
    def __init__(self, label: str, path: Path) -> None:
        self.label = label
        self._path = path

    def public_key(self) -> PublicKey:
        return public_of(load_private_key(self._path.read_bytes()))

    def cose_sign(self, data: bytes) -> bytes:
        return cose.sign(load_private_key(self._path.read_bytes()), data)


class FileKeyStore:
    """Private keys as PEM files (mode 0600) under ``directory``: the keys are as safe as the disk."""

    kind = "file"

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def _path(self, label: str) -> Path:
        return self.directory / (check_label(label).replace("/", "__") + ".key")

    def generate(self, label: str, alg: str = "es256") -> KeyHandle:
        path = self._path(label)
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        pem = private_key_pem(generate_private_key(_check_alg(alg)))
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise KeyStoreError(f"key {label!r} already exists") from None
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        return FileKey(label, path)

    def get(self, label: str) -> KeyHandle:
        path = self._path(label)
        if not path.is_file():
            raise KeyStoreError(f"no key {label!r} in {self.directory}")
        return FileKey(label, path)


# --- PKCS#11 ---------------------------------------------------------------------------------------


class Pkcs11Key:
    def __init__(self, store: Pkcs11KeyStore, label: str, public: PublicKey) -> None:
        self.label = label
        self._store = store
        self._public = public

    def public_key(self) -> PublicKey:
        return self._public

    def cose_sign(self, data: bytes) -> bytes:
        return self._store.sign(self.label, data, ed=isinstance(self._public, ed25519.Ed25519PublicKey))


class Pkcs11KeyStore:
    """Keys inside a PKCS#11 token: generated there (``CKA_SENSITIVE``, not ``CKA_EXTRACTABLE``),
    found by ``CKA_LABEL``, used through ``C_Sign``.  ES256 is signed as CKM_ECDSA over a SHA-256
    computed here (tokens rarely offer CKM_ECDSA_SHA256); EdDSA as CKM_EDDSA over the message.

    One session per operation, serialised by a lock: signing is rare and tokens differ in how
    many sessions and threads they accept."""

    kind = "pkcs11"

    def __init__(self, module: str, token_label: str, pin: str) -> None:
        import pkcs11

        self._pkcs11 = pkcs11
        try:
            lib = pkcs11.lib(module)
            try:
                self._token = lib.get_token(token_label=token_label)
            except pkcs11.NoSuchToken:
                lib.reinitialize()  # the module lists the slots it saw when first loaded
                self._token = lib.get_token(token_label=token_label)
        except (pkcs11.PKCS11Error, RuntimeError, OSError) as exc:
            raise KeyStoreError(f"PKCS#11 token {token_label!r} in {module}: {exc!r}") from None
        self._pin = pin
        self._lock = threading.Lock()

    @contextmanager
    def _session(self) -> Iterator[Any]:
        """A logged-in session; a wrong PIN or an unreachable token is a KeyStoreError."""
        with self._lock:
            try:
                session = self._token.open(rw=True, user_pin=self._pin)
            except self._pkcs11.PKCS11Error as exc:
                raise KeyStoreError(f"cannot log in to token {self._token.label!r}: {exc!r}") from None
            with session as s:
                yield s

    def _private(self, s: Any, label: str) -> Any:
        from pkcs11 import Attribute, ObjectClass

        found = list(s.get_objects({Attribute.LABEL: label, Attribute.CLASS: ObjectClass.PRIVATE_KEY}))
        if len(found) != 1:
            raise KeyStoreError(f"{len(found)} private keys labelled {label!r} in the token")
        return found[0]

    def _public(self, s: Any, label: str) -> PublicKey:
        from pkcs11 import Attribute, KeyType, ObjectClass
        from pkcs11.util.ec import encode_ec_public_key

        found = list(s.get_objects({Attribute.LABEL: label, Attribute.CLASS: ObjectClass.PUBLIC_KEY}))
        if len(found) != 1:
            raise KeyStoreError(f"{len(found)} public keys labelled {label!r} in the token")
        pub = found[0]
        if pub.key_type == KeyType.EC_EDWARDS:
            point = bytes(pub[Attribute.EC_POINT])
            raw = point[2:] if len(point) == 34 and point[:2] == b"\x04\x20" else point
            return ed25519.Ed25519PublicKey.from_public_bytes(raw)
        return public_of(load_der_public_key(encode_ec_public_key(pub)))  # type: ignore[arg-type]

    def generate(self, label: str, alg: str = "es256") -> KeyHandle:
        from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
        from pkcs11.util.ec import encode_named_curve_parameters

        check_label(label)
        _check_alg(alg)
        with self._session() as s:
            if list(s.get_objects({Attribute.LABEL: label, Attribute.CLASS: ObjectClass.PRIVATE_KEY})):
                raise KeyStoreError(f"key {label!r} already exists in the token")
            private = {Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False, Attribute.SIGN: True}
            try:
                if alg == "eddsa":
                    params = s.create_domain_parameters(
                        KeyType.EC_EDWARDS,
                        {Attribute.EC_PARAMS: encode_named_curve_parameters(ED25519_OID)},
                        local=True,
                    )
                    params.generate_keypair(
                        store=True,
                        label=label,
                        mechanism=Mechanism.EC_EDWARDS_KEY_PAIR_GEN,
                        private_template=private,
                    )
                else:
                    params = s.create_domain_parameters(
                        KeyType.EC,
                        {Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")},
                        local=True,
                    )
                    params.generate_keypair(store=True, label=label, private_template=private)
            except self._pkcs11.PKCS11Error as exc:
                raise KeyStoreError(f"the token could not generate a {alg} key: {exc!r}") from None
            public = self._public(s, label)
        log.info("generated %s key %s inside the PKCS#11 token", alg, label)
        return Pkcs11Key(self, label, public)

    def get(self, label: str) -> KeyHandle:
        with self._session() as s:
            self._private(s, label)
            return Pkcs11Key(self, check_label(label), self._public(s, label))

    def sign(self, label: str, data: bytes, *, ed: bool) -> bytes:
        from pkcs11 import Mechanism

        with self._session() as s:
            key = self._private(s, label)
            try:
                if ed:
                    return bytes(key.sign(data, mechanism=Mechanism.EDDSA))
                return bytes(key.sign(hashlib.sha256(data).digest(), mechanism=Mechanism.ECDSA))
            except self._pkcs11.PKCS11Error as exc:
                raise KeyStoreError(f"the token refused to sign with {label!r}: {exc!r}") from None


# --- SoftHSM2 (tests, demo, the embedded default) ----------------------------------------------------

SOFTHSM2_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
"""Debian's SoftHSM2 PKCS#11 module (package ``softhsm2``)."""


def softhsm_config(directory: Path) -> Path:
    """A SoftHSM2 configuration keeping its tokens under ``directory`` (created); the process that
    loads the module must have ``SOFTHSM2_CONF`` pointing at it before the module is first used."""
    tokens = Path(directory) / "tokens"
    tokens.mkdir(parents=True, exist_ok=True, mode=0o700)
    conf = Path(directory) / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n")
    return conf


def init_softhsm_token(conf: Path, label: str, pin: str, so_pin: str) -> None:
    """Initialise a fresh SoftHSM2 token ``label`` (``softhsm2-util --init-token --free``)."""
    import subprocess

    env = {**os.environ, "SOFTHSM2_CONF": str(conf)}
    cmd = ["softhsm2-util", "--init-token", "--free", "--label", label, "--pin", pin, "--so-pin", so_pin]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise KeyStoreError(f"softhsm2-util could not create token {label!r}: {done.stderr.strip()}")
