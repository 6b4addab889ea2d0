"""``fwcm keys``: signing keys for manifests, kept as local PEM files (never sent to the server)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import typer

from fwcm.manifest import generate_private_key, key_id, private_key_pem, public_key_pem

log = logging.getLogger(__name__)

app = typer.Typer(help="Manage manifest signing keys (local PEM files).", no_args_is_help=True)


def fail(message: str) -> typer.Exit:
    """Print one ``error: …`` line on stderr; the caller raises the returned exit (code 1)."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(1)


def write_file(path: Path, data: bytes, *, mode: int, force: bool) -> None:
    """Write ``data`` to ``path`` created with ``mode`` from the start (no window with wider rights)."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    fd = os.open(path, flags, mode)
    try:
        os.fchmod(fd, mode)  # an existing file overwritten with --force keeps no looser mode
        os.write(fd, data)
    finally:
        os.close(fd)


@app.command()
def generate(
    name: str = typer.Argument(
        ..., metavar="NAME", help="Base name: writes NAME.key (private) and NAME.pub (public)."
    ),
    alg: str = typer.Option("es256", "--alg", help="es256 (P-256) or eddsa (Ed25519)."),
    directory: Path = typer.Option(Path("."), "--dir", help="Directory to write the files into."),
    force: bool = typer.Option(False, "--force", help="Overwrite existing files."),
) -> None:
    """Generate a key pair: NAME.key (PEM PKCS#8, mode 0600) and NAME.pub (PEM SubjectPublicKeyInfo)."""
    if alg not in ("es256", "eddsa"):
        raise fail(f"unknown algorithm {alg!r} (use es256 or eddsa)")
    if not name or "/" in name or name in (".", ".."):
        raise fail(f"invalid key name {name!r} (a plain file name without directories)")
    key_path = directory / f"{name}.key"
    pub_path = directory / f"{name}.pub"
    if not force:
        for path in (key_path, pub_path):
            if path.exists():
                raise fail(f"{path} exists (use --force to overwrite)")
    key = generate_private_key(alg)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        write_file(key_path, private_key_pem(key), mode=0o600, force=force)
        write_file(pub_path, public_key_pem(key), mode=0o644, force=force)
    except OSError as exc:
        raise fail(f"cannot write key files: {exc.strerror or exc} ({exc.filename or directory})") from None
    kid = key_id(key).hex()
    log.info("generated %s key %s (kid %s)", alg, key_path, kid)
    typer.echo(f"wrote {key_path} and {pub_path} ({alg}, kid {kid})")
