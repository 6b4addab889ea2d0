"""``fwcm conformance`` refuses bad arguments before it serves anything (usage errors, exit 2)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from fwcm import manifest
from fwcm.cli.main import app


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "signer.pem"
    path.write_bytes(manifest.private_key_pem(manifest.generate_private_key("eddsa")))
    return path


def invoke(key_file: Path, *extra: str) -> tuple[int, str]:
    args = ["conformance", "--tenant", "acme", "--device", "dev-1", "--signing-key", str(key_file)]
    args += ["--vendor-domain", "example.com", "--model", "sensor-v1", "--transport", "coap"]
    result = CliRunner().invoke(app, [*args, *extra])
    return result.exit_code, result.output


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["--secret", "00" * 32, "--only", "no-such"], "unknown scenario no-such"),
        (["--secret", "not hex"], "device secret in hex"),
        (["--secret", "00" * 8], "16 to 64 bytes"),
        (["--secret", "00" * 32, "--coap-bind", "nowhere"], "HOST:PORT"),
        (["--secret", "00" * 32, "--transport", "ftp"], "mqtt or coap"),
        (["--secret", "00" * 32, "--device", "a/b"], "--device must match"),
    ],
)
def test_bad_arguments_are_usage_errors(key_file: Path, extra: list[str], says: str) -> None:
    code, output = invoke(key_file, *extra)
    assert code == 2
    assert says in " ".join(output.split()), output
