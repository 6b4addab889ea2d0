"""Client commands end to end: the Typer CLI talking HTTP to a real uvicorn server."""

from __future__ import annotations

import base64
import hashlib
import json
import stat
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from fwcm import manifest, protocol
from fwcm.cli import account, campaigns, devices, images, signers
from fwcm.cli.webhooks import webhook_app
from fwcm.store import deadletters, tenants

VENDOR = manifest.vendor_id_for_domain("example.com")
CLASS_A = manifest.class_id_for(VENDOR, "sensor-a")

cli = typer.Typer()
cli.add_typer(images.payload_app, name="payload")
cli.add_typer(signers.signer_app, name="signer")
cli.add_typer(devices.device_app, name="device")
cli.add_typer(campaigns.campaign_app, name="campaign")
manifest_app = typer.Typer()
manifest_app.command("upload")(images.manifest_upload)
manifest_app.command("list")(images.manifest_list)
cli.add_typer(manifest_app, name="manifest")
cli.command("login")(account.login)
cli.command("whoami")(account.whoami)
cli.add_typer(webhook_app, name="webhook")
runner = CliRunner()


@pytest.fixture
def server(live_api: str) -> str:
    return live_api


@pytest.fixture
def env(server: str, api: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    monkeypatch.setenv("FWCM_CONFIG", str(tmp_path / "cfg" / "config.toml"))
    monkeypatch.setenv("FWCM_URL", server)
    monkeypatch.setenv("FWCM_API_KEY", api.key)
    return {"url": server, "key": api.key}


def run(*args: Any) -> tuple[int, str, str]:
    result = runner.invoke(cli, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def ok_json(*args: Any) -> Any:
    code, out, err = run(*args, "--json")
    assert code == 0, err
    return json.loads(out)


def one_error(*args: Any) -> str:
    code, _out, err = run(*args)
    assert code == 1
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_full_tour_through_the_cli(env: dict[str, str], tmp_path: Path) -> None:
    key = manifest.generate_private_key()
    (tmp_path / "release.pub").write_bytes(manifest.public_key_pem(key))
    image = b"firmware v2 " * 1000
    (tmp_path / "fw.bin").write_bytes(image)
    sha = hashlib.sha256(image).hexdigest()
    info = manifest.ManifestInfo(
        3, VENDOR, CLASS_A, bytes.fromhex(sha), len(image), (f"{env['url']}/p/{sha}",)
    )
    (tmp_path / "fw.suit").write_bytes(manifest.build_envelope(info, key))

    code, out, err = run("signer", "add", "release", "--key", tmp_path / "release.pub")
    assert code == 0 and out.startswith("signer release added (es256"), err
    assert [s["name"] for s in ok_json("signer", "list")] == ["release"]

    code, out, _ = run("payload", "upload", tmp_path / "fw.bin")
    assert code == 0 and f"uploaded: {sha} ({len(image)} bytes)" in out
    code, out, _ = run("payload", "upload", tmp_path / "fw.bin")
    assert "already stored" in out
    assert ok_json("payload", "list")[0]["name"] == "fw.bin"
    assert ok_json("payload", "show", sha)["size"] == len(image)

    m = ok_json("manifest", "upload", tmp_path / "fw.suit")
    assert m["sequence"] == 3 and m["signer"] == "release"
    assert [x["id"] for x in ok_json("manifest", "list")] == [m["id"]]

    rows = [f"dev-{i},{VENDOR},{CLASS_A},region={'eu' if i % 2 else 'us'},1,,mqtt,," for i in range(20)]
    header = "name,vendor_id,class_id,tags,sequence,version,transport,hardware_id,secret"
    (tmp_path / "fleet.csv").write_text("\n".join([header, *rows]) + "\n")
    secrets_file = tmp_path / "secrets.csv"
    code, out, err = run("device", "import", tmp_path / "fleet.csv", "--secrets-out", secrets_file)
    assert code == 0 and out.startswith("imported 20 devices"), err
    assert stat.S_IMODE(secrets_file.stat().st_mode) == 0o600
    secret_lines = secrets_file.read_text().splitlines()
    assert secret_lines[0] == "name,secret,mqtt_username,mqtt_password" and len(secret_lines) == 21
    name, secret, username, password = secret_lines[1].split(",")
    assert username == f"acme/{name}"
    assert password == protocol.device_password(bytes.fromhex(secret), "acme", name)

    code, out, _ = run(
        "device", "add", "solo", "--vendor-id", VENDOR, "--class-id", CLASS_A, "--tag", "region=eu"
    )
    assert code == 0 and "secret (shown once)" in out
    assert "MQTT username: acme/solo; password (shown once): " in out
    page = ok_json("device", "list", "--filter", 'tag.region == "eu"')
    assert page["total"] == 11
    assert ok_json("device", "show", "solo")["tags"] == {"region": "eu"}
    code, out, _ = run("device", "list", "--filter", 'tag.region == "us"', "--limit", "3")
    assert code == 0 and "dev-0" in out and "of 10" in out

    campaign_toml = tmp_path / "eu.toml"
    campaign_toml.write_text(
        f'[campaign]\nname = "eu rollout"\nmanifest = {m["id"]}\nfilter = \'tag.region == "eu"\'\n\n'
        '[rollout]\nrate_per_minute = 100\nerror_threshold = "10%"\n'
    )
    c = ok_json("campaign", "create", "--file", campaign_toml)
    assert c["name"] == "eu rollout" and c["policy"]["rate_per_minute"] == 100
    assert [p["error_threshold"] for p in c["policy"]["phases"]] == ["10%"]
    assert c["filter"] == 'tag.region == "eu"'
    code, out, _ = run("campaign", "start", c["id"])
    assert code == 0 and out.strip() == f"campaign {c['id']} running over 11 devices"
    stats = ok_json("campaign", "status", c["id"])
    assert stats["counts"]["pending"] == 11 and stats["state"] == "running"
    code, out, _ = run("campaign", "status", c["id"])
    assert code == 0 and "running" in out and "0/11 finished" in out
    assert ok_json("campaign", "devices", c["id"], "--state", "pending")["total"] == 11
    code, out, _ = run("campaign", "pause", c["id"])
    assert out.strip() == f"campaign {c['id']} paused"
    assert ok_json("campaign", "show", c["id"])["state"] == "paused"
    assert [x["state"] for x in ok_json("campaign", "list")] == ["paused"]
    assert [e["state"] for e in ok_json("campaign", "events", c["id"])] == ["draft", "running", "paused"]


def test_cli_errors_are_one_line(env: dict[str, str], tmp_path: Path) -> None:
    assert one_error("device", "list", "--filter", "colour == 'red'") == (
        "error: invalid filter at column 1: unknown field 'colour' "
        "(known: vendor, class, name, version, transport, hardware_id, sequence, tag.<key>)"
    )
    assert one_error("device", "show", "ghost") == "error: device 'ghost' not found"
    assert one_error("campaign", "start", "77") == "error: campaign 77 not found"
    assert one_error("payload", "upload", tmp_path / "missing.bin").startswith("error: cannot read")
    (tmp_path / "x.suit").write_bytes(b"not cbor at all")
    assert one_error("manifest", "upload", tmp_path / "x.suit").startswith("error: manifest refused:")
    (tmp_path / "bad.csv").write_text(
        f"name,vendor_id,class_id\nok,{VENDOR},{CLASS_A}\nbad!,{VENDOR},{CLASS_A}\n"
    )
    line = one_error("device", "import", tmp_path / "bad.csv")
    assert "nothing imported" in line and "line 3: device name 'bad!'" in line
    assert one_error(
        "device", "add", "x", "--vendor-id", VENDOR, "--class-id", CLASS_A, "--tag", "novalue"
    ) == ("error: --tag 'novalue' must be KEY=VALUE")
    assert (
        one_error("campaign", "create", "--name", "x")
        == "error: --manifest is required (or set it in --file)"
    )


@pytest.mark.parametrize(
    ("rollout", "message"),
    [
        (
            'retries = { backoff = "100000000d" }',
            "rollout.retries.backoff: must be at least 0s and at most 365d",
        ),
        ("retries = { factor = 1e308 }", "rollout.retries.factor: must be at least 1 and at most 100"),
        ('device_timeout = "100000000d"', "rollout.device_timeout: must be at least 1s and at most 365d"),
        ("rate_per_minute = 1e308", "rollout.rate_per_minute: must be at least 1 and at most 1,000,000"),
        ("batch_max = 10000000000000000000", "rollout.batch_max: must be at least 1 and at most 100,000"),
    ],
)
def test_campaign_files_out_of_range_are_refused_before_sending(
    env: dict[str, str], api: Any, tmp_path: Path, rollout: str, message: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(f'[campaign]\nname = "x"\nmanifest = 1\n\n[rollout]\n{rollout}\n')
    assert one_error("campaign", "create", "--file", path).startswith(f"error: {path}: {message}, not ")
    assert api.client.get("/api/v1/campaigns").json()["items"] == []


def test_missing_key_and_unreachable_server(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FWCM_CONFIG", str(tmp_path / "none.toml"))
    monkeypatch.delenv("FWCM_API_KEY", raising=False)
    monkeypatch.delenv("FWCM_URL", raising=False)
    assert one_error("device", "list").startswith("error: no API key: set FWCM_API_KEY or run `fwcm login")
    monkeypatch.setenv("FWCM_API_KEY", "fwcm_x")
    monkeypatch.setenv("FWCM_URL", "http://127.0.0.1:9")  # discard port: nothing listens
    assert one_error("campaign", "list").startswith("error: cannot reach http://127.0.0.1:9")


def test_login_writes_private_config_and_checks_key(
    server: str, api: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tmp_path / "cfg" / "config.toml"
    monkeypatch.setenv("FWCM_CONFIG", str(cfg))
    monkeypatch.delenv("FWCM_API_KEY", raising=False)
    monkeypatch.delenv("FWCM_URL", raising=False)
    assert one_error("login", "--url", server, "--api-key", "fwcm_wrong") == (
        "error: login refused: invalid API key"
    )
    assert not cfg.exists()
    code, out, err = run("login", "--url", server + "/", "--api-key", api.key)
    assert code == 0 and "as tenant acme" in out, err
    assert stat.S_IMODE(cfg.stat().st_mode) == 0o600
    assert cfg.read_text() == f'url = "{server}"\napi_key = "{api.key}"\n'
    who = ok_json("whoami")
    assert who["slug"] == "acme" and who["url"] == server


def test_dead_letters_through_the_cli(env: dict[str, str], api: Any) -> None:
    with api.db.session() as s:
        other, _key = tenants.create_tenant(s, "other")
        Letter = deadletters.Letter
        deadletters.add(
            s,
            [
                Letter(api.tenant_id, "d1", "mqtt", b"\xd1raw", "integrity", "IntegrityError: boom"),
                Letter(api.tenant_id, "d2", "coap", b"\xd1raw2", "data", "DataError: too long"),
                Letter(other.id, "theirs", "mqtt", b"secret", "data", "not yours"),
            ],
        )
    page = ok_json("device", "dead-letters")
    assert page["total"] == 2  # only this tenant's
    assert [(d["device"], d["reason"], d["error"]) for d in page["items"]] == [
        ("d2", "data", "DataError: too long"),
        ("d1", "integrity", "IntegrityError: boom"),
    ]
    assert base64.b64decode(page["items"][1]["payload"]) == b"\xd1raw"
    assert [d["device"] for d in ok_json("device", "dead-letters", "--device", "d1")["items"]] == ["d1"]
    code, out, err = run("device", "dead-letters")
    assert code == 0 and "2 dead letters" in out and "DataError: too long" in out, err


def test_day_two_commands(env: dict[str, str]) -> None:
    for name, region in (("n1", "eu"), ("n2", "eu"), ("n3", "us")):
        ok_json(
            "device", "add", name, "--vendor-id", VENDOR, "--class-id", CLASS_A, "--tag", f"region={region}"
        )
    d = ok_json("device", "update", "n1", "--tag", "ring=canary", "--untag", "region", "--version", "2.0")
    assert (d["tags"], d["version"]) == ({"ring": "canary"}, "2.0")
    assert ok_json("device", "retag", "--filter", 'tag.region == "eu"', "--tag", "site=a") == {"matched": 1}
    assert ok_json("device", "show", "n2")["tags"] == {"region": "eu", "site": "a"}
    assert "nothing to change" in one_error("device", "update", "n1")
    assert "in service" in one_error("device", "delete", "n2")
    assert ok_json("device", "decommission", "n2")["withdrawn"] == 0
    code, out, err = run("device", "delete", "n2")
    assert code == 0 and "deleted" in out, err
    code, out, err = run("device", "delete", "n3", "--force")
    assert code == 0, err
    assert [x["name"] for x in ok_json("device", "list")["items"]] == ["n1"]
    assert ok_json("device", "events", "n1") == []
    assert "--failed" in one_error("campaign", "retry", "1")


def test_webhooks_through_the_cli(env: dict[str, str]) -> None:
    code, out, err = run("webhook", "add", "https://hooks.example.com/fwcm", "--events", "device.failed")
    assert code == 0, err
    assert "webhook 1 added for https://hooks.example.com/fwcm (device.failed)" in out
    secret = out.split("secret: ")[1].split()[0]
    assert len(secret) == 64
    hook = ok_json(
        "webhook", "add", "http://127.0.0.1:9/h", "--events", "campaign.state_changed,campaign.phase_advanced"
    )
    assert (
        hook["events"] == ["campaign.state_changed", "campaign.phase_advanced"] and hook["secret"] != secret
    )
    listed = ok_json("webhook", "list")
    assert [h["id"] for h in listed] == [1, hook["id"]]
    assert all("secret" not in h for h in listed)
    code, out, _ = run("webhook", "list")
    assert code == 0 and "webhooks" in out and "https://" in out
    assert ok_json("webhook", "deliveries", hook["id"]) == {"items": [], "total": 0, "limit": 50, "offset": 0}
    assert "only http and https" in one_error("webhook", "add", "ftp://example.com/")
    assert "unknown nope" in one_error("webhook", "add", "https://example.com/", "--events", "nope")
    code, out, _ = run("webhook", "remove", "1")
    assert code == 0 and "webhook 1 removed" in out
    assert "webhook 1 not found" in one_error("webhook", "remove", "1")
    assert "not found" in one_error("webhook", "deliveries", "1")
    assert [h["id"] for h in ok_json("webhook", "list")] == [hook["id"]]


def test_every_problem_of_a_csv_import_is_listed(env: dict[str, str], api: Any, tmp_path: Path) -> None:
    rows = [f"ok,{VENDOR},{CLASS_A}", f"bad!,{VENDOR},{CLASS_A}", f"x,{VENDOR},not-a-uuid", "short,row"]
    (tmp_path / "bad.csv").write_text("name,vendor_id,class_id\n" + "\n".join(rows) + "\n")
    code, _out, err = run("device", "import", tmp_path / "bad.csv")
    lines = err.splitlines()
    assert code == 1 and lines[0].startswith("error: CSV import refused, nothing imported"), err
    assert [line.split(":")[0].strip() for line in lines[1:]] == ["line 3", "line 4", "line 5"], err
    assert api.client.get("/api/v1/devices").json()["total"] == 0


def test_every_problem_of_a_campaign_file_is_listed(env: dict[str, str], tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[campaign]\nname = "x"\nmanifest = 1\nfilter = 5\n\n[rollout]\nrate_per_minute = 0\n')
    code, _out, err = run("campaign", "create", "--file", path)
    assert code == 1 and err.splitlines() == [
        f"error: {path}: 2 problems",
        "  line 4: campaign.filter: must be text, such as 'tag.region == \"eu\"'",
        "  line 7: rollout.rate_per_minute: must be at least 1 and at most 1,000,000, not 0",
    ]


def test_version_comes_from_the_installed_package() -> None:
    from importlib import metadata

    from fwcm.cli.main import app

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout == f"fwcm {metadata.version('fwcm')}\n"
