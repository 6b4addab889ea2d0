"""`fwcm keys` and `fwcm manifest` through Typer's CliRunner, on real files in a temporary directory."""

from __future__ import annotations

import hashlib
import json
import stat
import uuid
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from fwcm import delta
from fwcm.cli import keys, manifest
from fwcm.manifest import decode_envelope, key_id, load_private_key, load_public_key

app = typer.Typer()
app.add_typer(keys.app, name="keys")
app.add_typer(manifest.app, name="manifest")
runner = CliRunner()

FIRMWARE = b"\x7fELF firmware image " * 100


def run(*args: str | Path) -> tuple[int, str, str]:
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def one_error_line(stderr: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ")
    return lines[0]


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "fw.bin").write_bytes(FIRMWARE)
    return tmp_path


def create(workdir: Path, *extra: str, key: str = "signer", out: str = "m.suit") -> Path:
    code, stdout, stderr = run(
        "manifest", "create", workdir / "fw.bin", "--key", workdir / f"{key}.key",
        "--uri", "coap://127.0.0.1/p/{sha256}", "--uri", "http://127.0.0.1:8080/p/{sha256}",
        "--sequence", "5", "--output", workdir / out, *extra,
    )  # fmt: skip
    assert code == 0, stderr
    assert stdout.startswith(f"wrote {workdir / out}")
    return workdir / out


IDS = (
    "--vendor-id",
    "11111111-2222-3333-4444-555555555555",
    "--class-id",
    "66666666-7777-8888-9999-000000000000",
)


# --- keys -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["es256", "eddsa"])
def test_keys_generate(workdir: Path, alg: str) -> None:
    code, stdout, _ = run("keys", "generate", "signer", "--alg", alg, "--dir", workdir)
    assert code == 0
    key_file, pub_file = workdir / "signer.key", workdir / "signer.pub"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    private = load_private_key(key_file.read_bytes())
    public = load_public_key(pub_file.read_bytes())
    assert key_id(private) == key_id(public)
    assert key_id(public).hex() in stdout
    assert key_file.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert pub_file.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")


def test_keys_refuse_overwrite_without_force(workdir: Path) -> None:
    assert run("keys", "generate", "signer", "--dir", workdir)[0] == 0
    before = (workdir / "signer.key").read_bytes()
    code, _, stderr = run("keys", "generate", "signer", "--dir", workdir)
    assert code == 1
    assert "exists" in one_error_line(stderr)
    assert (workdir / "signer.key").read_bytes() == before
    (workdir / "signer.key").chmod(0o644)
    assert run("keys", "generate", "signer", "--dir", workdir, "--force")[0] == 0
    assert (workdir / "signer.key").read_bytes() != before
    assert stat.S_IMODE((workdir / "signer.key").stat().st_mode) == 0o600


def test_keys_bad_alg(workdir: Path) -> None:
    code, _, stderr = run("keys", "generate", "signer", "--alg", "rsa", "--dir", workdir)
    assert code == 1
    assert "rsa" in one_error_line(stderr)
    assert not (workdir / "signer.key").exists()


# --- create / inspect / verify ----------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["es256", "eddsa"])
def test_create_and_verify(workdir: Path, alg: str) -> None:
    run("keys", "generate", "signer", "--alg", alg, "--dir", workdir)
    path = create(workdir, *IDS)
    env = decode_envelope(path.read_bytes())
    digest = hashlib.sha256(FIRMWARE).hexdigest()
    assert env.info.image_digest.hex() == digest
    assert env.info.image_size == len(FIRMWARE)
    assert env.info.sequence == 5
    assert env.info.vendor_id == uuid.UUID(IDS[1])
    assert env.info.class_id == uuid.UUID(IDS[3])
    assert env.info.uris == (f"coap://127.0.0.1/p/{digest}", f"http://127.0.0.1:8080/p/{digest}")

    code, stdout, stderr = run("manifest", "verify", path, "--key", workdir / "signer.pub")
    assert code == 0, stderr
    assert stdout.splitlines() == [stdout.strip()]
    assert stdout.startswith("valid: sequence 5")
    assert stderr == ""


def test_uuid5_options(workdir: Path) -> None:
    run("keys", "generate", "signer", "--dir", workdir)
    path = create(workdir, "--vendor-domain", "example.com", "--model", "sensor-v1")
    info = decode_envelope(path.read_bytes()).info
    vendor = uuid.uuid5(uuid.NAMESPACE_DNS, "example.com")
    assert info.vendor_id == vendor
    assert info.class_id == uuid.uuid5(vendor, "sensor-v1")


@pytest.mark.parametrize(
    "ids",
    [
        (),
        ("--vendor-domain", "example.com", "--vendor-id", IDS[1], "--class-id", IDS[3]),
        ("--vendor-domain", "example.com"),
        ("--vendor-domain", "example.com", "--model", "m", "--class-id", IDS[3]),
    ],
)
def test_create_id_options_must_be_unambiguous(workdir: Path, ids: tuple[str, ...]) -> None:
    run("keys", "generate", "signer", "--dir", workdir)
    code, _, stderr = run(
        "manifest", "create", workdir / "fw.bin", "--key", workdir / "signer.key", "--uri", "coap://h/p",
        "--sequence", "1", "--output", workdir / "m.suit", *ids,
    )  # fmt: skip
    assert code == 1
    assert "exactly one of" in one_error_line(stderr)
    assert not (workdir / "m.suit").exists()


@pytest.mark.parametrize(
    ("what", "expect"),
    [("firmware", "cannot read firmware"), ("key", "cannot read key"), ("badkey", "private key")],
)
def test_create_unreadable_inputs(workdir: Path, what: str, expect: str) -> None:
    run("keys", "generate", "signer", "--dir", workdir)
    firmware = workdir / ("missing.bin" if what == "firmware" else "fw.bin")
    key = workdir / ("missing.key" if what == "key" else "signer.key")
    if what == "badkey":
        key = workdir / "signer.pub"
    code, _, stderr = run(
        "manifest", "create", firmware, "--key", key, "--uri", "coap://h/p", "--sequence", "1",
        "--output", workdir / "m.suit", *IDS,
    )  # fmt: skip
    assert code == 1
    assert expect in one_error_line(stderr)


def test_verify_wrong_key(workdir: Path) -> None:
    run("keys", "generate", "signer", "--dir", workdir)
    run("keys", "generate", "other", "--alg", "eddsa", "--dir", workdir)
    path = create(workdir, *IDS)
    code, stdout, stderr = run("manifest", "verify", path, "--key", workdir / "other.pub")
    assert code == 1
    assert stdout == ""
    assert one_error_line(stderr).startswith(f"error: signature does not verify with {workdir / 'other.pub'}")
    # several keys: the signer among them is enough
    code, stdout, _ = run(
        "manifest", "verify", path, "--key", workdir / "other.pub", "--key", workdir / "signer.pub"
    )
    assert code == 0
    assert f"signed by {workdir / 'signer.pub'}" in stdout


@pytest.mark.parametrize(
    ("setup", "expect"),
    [
        ("missing-manifest", "cannot read manifest"),
        ("missing-key", "cannot read key"),
        ("not-a-manifest", "is not a valid manifest"),
        ("not-a-key", "public key"),
    ],
)
def test_verify_errors(workdir: Path, setup: str, expect: str) -> None:
    run("keys", "generate", "signer", "--dir", workdir)
    path = create(workdir, *IDS)
    key = workdir / "signer.pub"
    if setup == "missing-manifest":
        path = workdir / "nope.suit"
    elif setup == "missing-key":
        key = workdir / "nope.pub"
    elif setup == "not-a-manifest":
        path = workdir / "fw.bin"
    elif setup == "not-a-key":
        key = workdir / "fw.bin"
    code, stdout, stderr = run("manifest", "verify", path, "--key", key)
    assert code == 1
    assert stdout == ""
    assert expect in one_error_line(stderr)


def test_verify_fails_for_every_single_bit_flip(workdir: Path) -> None:
    """The acceptance criterion, end to end through the CLI: no flipped bit is ever accepted."""
    run("keys", "generate", "signer", "--alg", "eddsa", "--dir", workdir)
    code, _, stderr = run(
        "manifest", "create", workdir / "fw.bin", "--key", workdir / "signer.key", "--uri", "coap://h/p",
        "--sequence", "1", "--output", workdir / "m.suit", *IDS,
    )  # fmt: skip
    assert code == 0, stderr
    raw = (workdir / "m.suit").read_bytes()
    flipped = workdir / "flipped.suit"
    accepted = []
    for bit in range(len(raw) * 8):
        data = bytearray(raw)
        data[bit // 8] ^= 0x80 >> (bit % 8)
        flipped.write_bytes(bytes(data))
        code, _, stderr = run("manifest", "verify", flipped, "--key", workdir / "signer.pub")
        if code != 1:
            accepted.append(bit)
        else:
            one_error_line(stderr)
    assert accepted == []


def test_inspect_table_and_json(workdir: Path) -> None:
    run("keys", "generate", "signer", "--dir", workdir)
    path = create(workdir, *IDS)
    code, stdout, _ = run("manifest", "inspect", path, "--json")
    assert code == 0
    data = json.loads(stdout)
    digest = hashlib.sha256(FIRMWARE).hexdigest()
    assert data["sequence"] == 5
    assert data["vendor_id"] == IDS[1] and data["class_id"] == IDS[3]
    assert data["image_digest"] == digest and data["image_size"] == len(FIRMWARE)
    assert data["uris"][0] == f"coap://127.0.0.1/p/{digest}"
    assert data["signatures"][0]["alg"] == "ESP256" and data["signatures"][0]["alg_id"] == -9
    kid = key_id(load_public_key((workdir / "signer.pub").read_bytes())).hex()
    assert data["signatures"][0]["kid"] == kid

    code, stdout, _ = run("manifest", "inspect", path)
    assert code == 0
    assert "sequence" in stdout and IDS[1] in stdout and "ESP256" in stdout

    code, _, stderr = run("manifest", "inspect", workdir / "fw.bin")
    assert code == 1
    one_error_line(stderr)


# --- components, text, algorithms -------------------------------------------------------------------

RADIO = b"radio core firmware " * 60


def create_two(workdir: Path, *extra: str) -> tuple[int, str, str]:
    (workdir / "radio.bin").write_bytes(RADIO)
    return run(
        "manifest", "create", "--component", f"app={workdir / 'fw.bin'}",
        "--component", f"radio={workdir / 'radio.bin'}", "--key", workdir / "signer.key",
        "--uri", "coap://127.0.0.1/p/{sha256}", "--uri", "http://127.0.0.1:8080/p/{sha256}",
        "--sequence", "9", "--output", workdir / "two.suit", *IDS, *extra,
    )  # fmt: skip


def test_two_components_create_inspect_verify(workdir: Path) -> None:
    run("keys", "generate", "signer", "--dir", workdir)
    code, stdout, stderr = create_two(
        workdir,
        "--text-description",
        "dual-core 3.0",
        "--text-version",
        "app=3.0.0",
        "--text-version",
        "radio=1.2",
    )
    assert code == 0, stderr
    assert "2 components" in stdout and "ESP256" in stdout
    app_digest, radio_digest = hashlib.sha256(FIRMWARE).hexdigest(), hashlib.sha256(RADIO).hexdigest()

    env = decode_envelope((workdir / "two.suit").read_bytes())
    assert [(c.id, c.image_digest.hex(), c.image_size) for c in env.info.components] == [
        ((b"app",), app_digest, len(FIRMWARE)),
        ((b"radio",), radio_digest, len(RADIO)),
    ]
    assert env.info.components[1].uris == (
        f"coap://127.0.0.1/p/{radio_digest}",
        f"http://127.0.0.1:8080/p/{radio_digest}",
    )
    assert env.signatures[0].alg == -9

    code, stdout, _ = run("manifest", "inspect", workdir / "two.suit", "--json")
    assert code == 0
    data = json.loads(stdout)
    assert [c["name"] for c in data["components"]] == ["app", "radio"]
    assert data["components"][1]["image_digest"] == radio_digest
    assert data["severable"] == [
        {"key": 23, "name": "text", "digest": env.severable[0].digest.hex(), "present": True}
    ]
    (text,) = data["text"]
    assert text["manifest_description"] == "dual-core 3.0"
    assert [(c["component"], c["version"]) for c in text["components"]] == [
        ([b"app".hex()], "3.0.0"),
        ([b"radio".hex()], "1.2"),
    ]
    code, stdout, _ = run("manifest", "inspect", workdir / "two.suit")
    assert code == 0
    assert (
        "radio: image digest" in stdout and "dual-core 3.0" in stdout and "carried, digest matches" in stdout
    )

    code, stdout, stderr = run("manifest", "verify", workdir / "two.suit", "--key", workdir / "signer.pub")
    assert code == 0, stderr
    assert "2 components (app" in stdout and "ESP256" in stdout


def test_text_with_a_wrong_digest_is_refused(workdir: Path) -> None:
    run("keys", "generate", "signer", "--alg", "eddsa", "--dir", workdir)
    path = create(workdir, *IDS, "--text-vendor", "Example Ltd", "--text-version", "2.0")
    data = bytearray(path.read_bytes())
    at = data.rindex(b"Example Ltd")
    data[at] = ord("e")
    path.write_bytes(bytes(data))
    for command in ("inspect", "verify"):
        extra = ["--key", workdir / "signer.pub"] if command == "verify" else []
        code, _, stderr = run("manifest", command, path, *extra)
        assert code == 1
        assert "text (23) does not match its digest in the manifest" in one_error_line(stderr)


@pytest.mark.parametrize(("keyalg", "alg", "alg_id"), [("es256", "es256", -7), ("eddsa", "eddsa", -8)])
def test_older_algorithm_on_request(workdir: Path, keyalg: str, alg: str, alg_id: int) -> None:
    run("keys", "generate", "signer", "--alg", keyalg, "--dir", workdir)
    path = create(workdir, *IDS, "--alg", alg)
    assert decode_envelope(path.read_bytes()).signatures[0].alg == alg_id
    code, _, _ = run("manifest", "verify", path, "--key", workdir / "signer.pub")
    assert code == 0


@pytest.mark.parametrize(
    ("args", "expect"),
    [
        (["--alg", "ed25519"], "does not fit this key"),
        (["--alg", "rs256"], "unknown --alg"),
        (["--uri", "coap://h/fixed"], "needs {sha256}"),
        (["--component", "app=x"], "given twice"),
        (["--component", "nofile"], "expected NAME=FILE"),
        (["--text-version", "gps=1"], "no component 'gps'"),
    ],
)
def test_create_errors_for_components(workdir: Path, args: list[str], expect: str) -> None:
    run("keys", "generate", "signer", "--dir", workdir)
    code, _, stderr = create_two(workdir, *args)
    assert code == 1
    assert expect in one_error_line(stderr)


def test_firmware_or_components_not_both(workdir: Path) -> None:
    run("keys", "generate", "signer", "--dir", workdir)
    code, _, stderr = run(
        "manifest", "create", workdir / "fw.bin", "--component", f"a={workdir / 'fw.bin'}",
        "--key", workdir / "signer.key", "--uri", "coap://h/{sha256}", "--sequence", "1",
        "--output", workdir / "x.suit", *IDS,
    )  # fmt: skip
    assert code == 1 and "either FIRMWARE or" in one_error_line(stderr)


def test_delta_manifest_create_inspect_verify(workdir: Path) -> None:
    run("keys", "generate", "signer", "--dir", workdir)
    base = b"\x7fELF firmware image v1 " * 100
    (workdir / "base.bin").write_bytes(base)
    code, stdout, stderr = run(
        "manifest", "create", workdir / "fw.bin", "--delta-from", workdir / "base.bin",
        "--patch-output", workdir / "fw.patch", "--key", workdir / "signer.key",
        "--uri", "coap://127.0.0.1/p/{sha256}", "--sequence", "6", "--output", workdir / "d.suit", *IDS,
    )  # fmt: skip
    assert code == 0, stderr
    patch = (workdir / "fw.patch").read_bytes()
    assert "delta:" in stdout and f"({len(patch)} bytes)" in stdout
    assert delta.apply_patch(base, patch, expected_size=len(FIRMWARE)) == FIRMWARE
    env = decode_envelope((workdir / "d.suit").read_bytes())
    assert env.info.delta is not None and env.info.uris == ()
    assert env.info.delta.base_digest == hashlib.sha256(base).digest()
    assert env.info.delta.uris == (f"coap://127.0.0.1/p/{hashlib.sha256(patch).hexdigest()}",)
    code, stdout, _ = run("manifest", "inspect", workdir / "d.suit", "--json")
    assert code == 0
    data = json.loads(stdout)
    assert data["delta"]["patch_size"] == len(patch) and data["delta"]["base_size"] == len(base)
    assert data["image_digest"] == hashlib.sha256(FIRMWARE).hexdigest()
    code, _, stderr = run("manifest", "verify", workdir / "d.suit", "--key", workdir / "signer.pub")
    assert code == 0, stderr


def test_delta_options_go_together(workdir: Path) -> None:
    run("keys", "generate", "signer", "--dir", workdir)
    code, _, stderr = create_two(workdir, "--delta-from", workdir / "fw.bin")
    assert code == 1 and "go together" in one_error_line(stderr)
    code, _, stderr = create_two(workdir, "--delta-from", workdir / "fw.bin", "--patch-output", workdir / "p")
    assert code == 1 and "one FIRMWARE image" in one_error_line(stderr)
