"""Repository behaviour on real databases (SQLite file and PostgreSQL when configured)."""

from __future__ import annotations

import hashlib
import os
import uuid
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from packaging.version import Version
from sqlalchemy import func, select

from fwcm import filters, manifest
from fwcm.devices import parse_devices_csv, validate_device
from fwcm.errors import Conflict, ImportErrors, Invalid, NotFound
from fwcm.rollout import launch
from fwcm.rollout.groups import Member
from fwcm.store import campaigns, images, progress, tenants, trust
from fwcm.store import devices as device_store
from fwcm.store.db import Database
from fwcm.store.models import CampaignEvent, Deployment, Device, Manifest
from fwcm.store.payloads import PayloadStore, PayloadTooLarge

VENDOR = str(manifest.vendor_id_for_domain("example.com"))
CLASS_A = str(manifest.class_id_for(uuid.UUID(VENDOR), "sensor-a"))
CLASS_B = str(manifest.class_id_for(uuid.UUID(VENDOR), "sensor-b"))


def _tenant(db: Database, slug: str) -> int:
    with db.session() as s:
        t, _key = tenants.create_tenant(s, slug)
        return t.id


def _csv(rows: list[str]) -> str:
    return "name,vendor_id,class_id,tags,sequence,version,transport,hardware_id,secret\n" + "\n".join(rows)


FLEET = [
    # name, class, tags, sequence, version, transport, hardware_id
    ("d1", CLASS_A, {"region": "eu", "rack": "1"}, 1, "1.0", "mqtt", "hw-1"),
    ("d2", CLASS_A, {"region": "eu"}, 5, "1.5", "coap", None),
    ("d3", CLASS_A, {"region": "us", "rack": "2"}, 8, None, "mqtt", "hw-3"),
    ("d4", CLASS_B, {"region": "eu", "rack": "10"}, 9, "2.0", "coap", None),
    ("d5", CLASS_B, {}, 0, None, "mqtt", None),
]


def _add_fleet(db: Database, tenant_id: int) -> None:
    with db.session() as s:
        for name, cls, tags, seq, version, transport, hw in FLEET:
            device_store.register_device(
                s,
                tenant_id,
                validate_device(name, VENDOR, cls, tags, seq, version, transport, hw),
            )


def _names(db: Database, tenant_id: int, text: str) -> list[str]:
    with db.session() as s:
        _total, rows = device_store.list_devices(s, tenant_id, text, limit=1000)
        return [d.name for d in rows]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", ["d1", "d2", "d3", "d4", "d5"]),
        (f'class == "{CLASS_A}" and tag.region == "eu" and sequence < 8', ["d1", "d2"]),
        ('tag.region == "eu"', ["d1", "d2", "d4"]),
        ('tag.region != "eu"', ["d3", "d5"]),
        ('not tag.region == "eu"', ["d3", "d5"]),
        ('tag.region in ["us", "asia"]', ["d3"]),
        ('tag.region not in ["us"]', ["d1", "d2", "d4", "d5"]),
        ("exists tag.rack", ["d1", "d3", "d4"]),
        ("not exists tag.rack", ["d2", "d5"]),
        ("tag.rack == 10", ["d4"]),
        ('tag.rack < "2"', ["d1", "d4"]),
        ("sequence >= 8 or transport == 'coap'", ["d2", "d3", "d4"]),
        ("version == '1.0' or version == '2.0'", ["d1", "d4"]),
        ("version != '1.0'", ["d2", "d3", "d4", "d5"]),
        ("hardware_id in ['hw-1', 'hw-3']", ["d1", "d3"]),
        ("exists version and not exists hardware_id", ["d2", "d4"]),
        (f"vendor == '{VENDOR.upper()}' and class != '{CLASS_A}'", ["d4", "d5"]),
        ("name in []", []),
        ("name not in []", ["d1", "d2", "d3", "d4", "d5"]),
        ("(name == 'd1' or name == 'd2') and not (sequence > 1)", ["d1"]),
    ],
)
def test_filters_select_expected_devices(db: Database, text: str, expected: list[str]) -> None:
    tid = _tenant(db, "acme")
    _add_fleet(db, tid)
    assert _names(db, tid, text) == expected


def _py_value(field: str, dev: tuple[Any, ...]) -> Any:
    name, cls, tags, seq, version, transport, hw = dev
    if filters.is_tag(field):
        return tags.get(filters.tag_key(field))
    return {
        "name": name,
        "vendor": VENDOR,
        "class": cls,
        "sequence": seq,
        "version": version,
        "transport": transport,
        "hardware_id": hw,
    }[field]


def _py_eval(node: filters.Node, dev: tuple[Any, ...]) -> bool:
    """Reference semantics of the filter language, written independently of the SQL compiler."""
    if isinstance(node, filters.All):
        return True
    if isinstance(node, filters.And):
        return all(_py_eval(i, dev) for i in node.items)
    if isinstance(node, filters.Or):
        return any(_py_eval(i, dev) for i in node.items)
    if isinstance(node, filters.Not):
        return not _py_eval(node.item, dev)
    v = _py_value(node.field, dev)
    if isinstance(node, filters.Exists):
        return v is not None
    if isinstance(node, filters.In):
        found = v is not None and v in node.values
        return not found if node.negated else found
    assert isinstance(node, filters.Compare)
    if v is None:
        return node.op == "!="
    value: Any = node.value
    if node.field == "version" and node.op not in ("==", "!="):  # semantic version precedence
        v, value = Version(v), Version(str(value))
    return {
        "==": v == value,
        "!=": v != value,
        "<": v < value,
        "<=": v <= value,
        ">": v > value,
        ">=": v >= value,
    }[node.op]


_small_text = st.text(alphabet="abdeu129.", max_size=3)
_fields = st.sampled_from(["name", "version", "transport", "hardware_id", "tag.region", "tag.rack", "tag.x"])


@st.composite
def _leaf(draw: st.DrawFn) -> filters.Node:
    kind = draw(st.sampled_from(["cmp", "cmp", "seq", "in", "exists"]))
    if kind == "seq":
        return filters.Compare(
            "sequence", draw(st.sampled_from(filters.COMPARE_OPS)), draw(st.integers(-1, 10))
        )
    field = draw(_fields)
    if kind == "exists":
        return filters.Exists(field)
    pool = st.one_of(_small_text, st.sampled_from(["eu", "us", "1", "10", "d1", "d4", "mqtt", "1.0", "hw-1"]))
    if kind == "in":
        return filters.In(field, tuple(draw(st.lists(pool, max_size=3))), draw(st.booleans()))
    op = draw(st.sampled_from(filters.COMPARE_OPS))
    if field == "version" and op not in ("==", "!="):  # orderings take a semantic version
        pool = st.sampled_from(["1", "1.0", "1.5.0", "1.10", "2", "10.0.1", "0.9"])
    return filters.Compare(field, op, draw(pool))


_asts = st.recursive(
    _leaf(),
    lambda c: st.one_of(
        c.map(filters.Not),
        st.lists(c, min_size=2, max_size=3).map(lambda xs: filters.And(tuple(xs))),
        st.lists(c, min_size=2, max_size=3).map(lambda xs: filters.Or(tuple(xs))),
    ),
    max_leaves=6,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(node=_asts)
def test_sql_filter_matches_reference_semantics(db: Database, node: filters.Node) -> None:
    # The fleet is written once per database; hypothesis then only reads.
    with db.session() as s:
        t = tenants.tenant_by_slug(s, "ref")
        tid = t.id if t else None
    if tid is None:
        tid = _tenant(db, "ref")
        _add_fleet(db, tid)
    text = filters.to_text(node)
    expected = sorted(d[0] for d in FLEET if _py_eval(node, d))
    assert _names(db, tid, text) == expected, text


def test_list_devices_paginates_and_counts(db: Database) -> None:
    tid = _tenant(db, "acme")
    _add_fleet(db, tid)
    with db.session() as s:
        total, rows = device_store.list_devices(s, tid, 'tag.region == "eu"', limit=2, offset=1)
    assert total == 3
    assert [d.name for d in rows] == ["d2", "d4"]


def test_csv_import_all_or_nothing_with_line_numbers(db: Database) -> None:
    tid = _tenant(db, "acme")
    good = f"ok1,{VENDOR},{CLASS_A},region=eu;rack=2,3,1.0,mqtt,hw,"
    text = _csv(
        [
            good,
            f"bad name!,{VENDOR},{CLASS_A},,0,,mqtt,,",
            f"ok2,not-a-uuid,{CLASS_A},,0,,mqtt,,",
            f"ok3,{VENDOR},{CLASS_A},region,0,,mqtt,,",
            f"ok4,{VENDOR},{CLASS_A},,-1,,mqtt,,",
            f"ok5,{VENDOR},{CLASS_A},,0,,carrier-pigeon,,",
            f"ok6,{VENDOR},{CLASS_A},,0,,mqtt,,abcd",
            f"ok1,{VENDOR},{CLASS_A},,0,,mqtt,,",
            "too,few",
        ]
    )
    with pytest.raises(ImportErrors) as info, db.session() as s:
        device_store.import_devices(s, tid, parse_devices_csv(text))
    errs = info.value.errors
    assert [e.split(":")[0] for e in errs] == [f"line {n}" for n in range(3, 11)]
    assert "device name 'bad name!'" in errs[0]
    assert "vendor_id must be a UUID" in errs[1]
    assert "tag 'region' is not key=value" in errs[2]
    assert "sequence must be a non-negative integer" in errs[3]
    assert "transport must be one of mqtt, coap" in errs[4]
    assert "secret must be 32 bytes" in errs[5]
    assert "already appears on line 2" in errs[6]
    assert "expected 9 fields, found 2" in errs[7]
    with db.session() as s:
        assert s.scalar(select(func.count()).select_from(Device)) == 0


def test_csv_import_refuses_names_that_exist(db: Database) -> None:
    tid = _tenant(db, "acme")
    _add_fleet(db, tid)
    with pytest.raises(Conflict, match="'d2'"), db.session() as s:
        device_store.import_devices(
            s,
            tid,
            parse_devices_csv(_csv([f"new1,{VENDOR},{CLASS_A},,,,,,", f"d2,{VENDOR},{CLASS_A},,,,,,"])),
        )
    with db.session() as s:
        assert s.scalar(select(func.count()).select_from(Device).where(Device.name == "new1")) == 0


def test_csv_import_header_subset_and_given_secret(db: Database) -> None:
    tid = _tenant(db, "acme")
    secret = os.urandom(32).hex()
    text = f"class_id,name,vendor_id,secret\n{CLASS_A},x1,{VENDOR},{secret}\n\n{CLASS_B},x2,{VENDOR},\n"
    devices = parse_devices_csv(text)
    with db.session() as s:
        device_store.import_devices(s, tid, devices)
    assert [d.name for d in devices] == ["x1", "x2"]
    with db.session() as s:
        x1 = device_store.get_device(s, tid, "x1")
        x2 = device_store.get_device(s, tid, "x2")
        assert x1.secret.hex() == secret and x1.transport == "mqtt" and x1.sequence == 0
        assert len(x2.secret) == 32 and x2.secret == devices[1].secret


def _manifest(db: Database, tid: int) -> int:
    key = manifest.generate_private_key()
    info = manifest.ManifestInfo(
        sequence=9,
        vendor_id=uuid.UUID(VENDOR),
        class_id=uuid.UUID(CLASS_A),
        image_digest=hashlib.sha256(b"fw").digest(),
        image_size=2,
        uris=("http://127.0.0.1/p/x",),
    )
    with db.session() as s:
        trust.add_signer(s, tid, f"k{tid}", manifest.public_key_pem(key))
        m, created = images.upload_manifest(s, tid, manifest.build_envelope(info, key))
        assert created
        return m.id


def test_campaign_start_freezes_matching_subset(db: Database) -> None:
    tid = _tenant(db, "acme")
    other = _tenant(db, "other")
    _add_fleet(db, tid)
    _add_fleet(db, other)  # same names and tags in another tenant: must not join
    mid = _manifest(db, tid)
    with db.session() as s:
        c = campaigns.create_campaign(
            s, tid, mid, launch.draft("eu", "tag.region == 'eu'", {"rate_per_minute": 10})
        )
        cid = c.id
        assert c.state == "draft" and c.filter == 'tag.region == "eu"'
    with db.session() as s:
        c = campaigns.start_campaign(s, tid, cid, launch.start_plan)
        assert (c.state, c.total) == ("running", 3)
        assert c.started_at is not None
    # A device registered later does not join a started campaign.
    with db.session() as s:
        device_store.register_device(s, tid, validate_device("late", VENDOR, CLASS_A, {"region": "eu"}))
    with db.session() as s:
        rows = s.execute(
            select(Device.name, Deployment.state, Deployment.tenant_id, Deployment.last_seq)
            .join(Device, Device.id == Deployment.device_id)
            .where(Deployment.campaign_id == cid)
            .order_by(Device.name)
        ).all()
        assert [tuple(r) for r in rows] == [
            ("d1", "pending", tid, -1),
            ("d2", "pending", tid, -1),
            ("d4", "pending", tid, -1),
        ]
        stats = progress.campaign_stats(s, tid, cid, launch.phase_names, launch.pace)
        assert stats["total"] == 3 and stats["counts"]["pending"] == 3 and stats["counts"]["failed"] == 0
        total, devs = progress.campaign_devices(s, tid, cid, state="pending")
        assert total == 3 and [d["device"] for d in devs] == ["d1", "d2", "d4"]
        states = [e.state for e in s.scalars(select(CampaignEvent).where(CampaignEvent.campaign_id == cid))]
        assert states == ["draft", "running"]
    with pytest.raises(Conflict, match="is running"), db.session() as s:
        campaigns.start_campaign(s, tid, cid, launch.start_plan)
    with pytest.raises(NotFound), db.session() as s:
        campaigns.start_campaign(s, other, cid, launch.start_plan)


def test_campaign_state_changes(db: Database) -> None:
    tid = _tenant(db, "acme")
    _add_fleet(db, tid)
    mid = _manifest(db, tid)
    with db.session() as s:
        cid = campaigns.create_campaign(s, tid, mid, launch.draft("all", "", None)).id
    with pytest.raises(Conflict, match="pause needs a campaign that is running"), db.session() as s:
        campaigns.change_campaign(s, tid, cid, "pause")
    with db.session() as s:
        campaigns.start_campaign(s, tid, cid, launch.start_plan)
        assert campaigns.change_campaign(s, tid, cid, "pause").state == "paused"
        assert campaigns.change_campaign(s, tid, cid, "resume").state == "running"
        c = campaigns.change_campaign(s, tid, cid, "cancel")
        # finished_at is set by the engine once it has withdrawn the notices (tests/e2e)
        assert c.state == "cancelled" and c.finished_at is None
    with pytest.raises(Conflict), db.session() as s:
        campaigns.change_campaign(s, tid, cid, "resume")
    with db.session() as s:
        _total, events = progress.campaign_events(s, tid, cid)
        assert [e.state for e in events] == [
            "draft",
            "running",
            "paused",
            "running",
            "cancelled",
        ]


def test_campaign_refuses_bad_filter_and_foreign_manifest(db: Database) -> None:
    tid = _tenant(db, "acme")
    other = _tenant(db, "other")
    mid = _manifest(db, other)
    with pytest.raises(filters.FilterError, match="unknown field 'colour'"):
        launch.draft("x", "colour == 'red'")
    with pytest.raises(Invalid, match=f"manifest {mid} not found"), db.session() as s:
        campaigns.create_campaign(s, tid, mid, launch.draft("x", ""))


def test_manifest_dedupe_and_signer_revocation(db: Database) -> None:
    tid = _tenant(db, "acme")
    key = manifest.generate_private_key("eddsa")
    info = manifest.ManifestInfo(
        sequence=1,
        vendor_id=uuid.UUID(VENDOR),
        class_id=uuid.UUID(CLASS_A),
        image_digest=bytes(32),
        image_size=1,
        uris=("coap://h/p/0",),
    )
    env = manifest.build_envelope(info, key)
    with db.session() as s:
        sg = trust.add_signer(s, tid, "release", manifest.public_key_pem(key).decode())
        assert sg.alg == "eddsa" and sg.key_id == manifest.key_id(key).hex()
        first, created1 = images.upload_manifest(s, tid, env)
        again, created2 = images.upload_manifest(s, tid, env)
        assert created1 and not created2 and first.id == again.id
        assert first.envelope == env and first.signer_id == sg.id
    with pytest.raises(Conflict, match="already registered as signer 'release'"), db.session() as s:
        trust.add_signer(s, tid, "again", manifest.public_key_pem(key))
    with db.session() as s:
        trust.revoke_signer(s, tid, "release")
    info2 = manifest.ManifestInfo(**{**info.__dict__, "sequence": 2})
    with pytest.raises(manifest.SignatureError), db.session() as s:
        images.upload_manifest(s, tid, manifest.build_envelope(info2, key))
    with db.session() as s:
        assert s.scalar(select(func.count()).select_from(Manifest)) == 1


def test_tenant_keys_are_hashed_and_resolve(db: Database) -> None:
    with db.session() as s:
        t, key = tenants.create_tenant(s, "acme", "Acme")
    assert key.startswith("fwcm_")
    with db.session() as s:
        found = tenants.tenant_for_key(s, key)
        assert found is not None and found.id == t.id
        assert tenants.tenant_for_key(s, key + "x") is None
        assert tenants.tenant_for_key(s, "garbage") is None
        from fwcm.store.models import ApiKey

        stored = s.scalars(select(ApiKey.key_hash)).all()
        assert key not in stored and hashlib.sha256(key.encode()).hexdigest() in stored
    with pytest.raises(Conflict), db.session() as s:
        tenants.create_tenant(s, "acme")
    with pytest.raises(Invalid), db.session() as s:
        tenants.create_tenant(s, "no spaces")


def test_payload_store_is_atomic_and_content_addressed(tmp_path: Any) -> None:
    store = PayloadStore(tmp_path / "payloads")
    data = os.urandom(300_000)
    sha = hashlib.sha256(data).hexdigest()
    stored = store.write_chunks((data[i : i + 4096] for i in range(0, len(data), 4096)), limit=1 << 20)
    assert stored.sha256 == sha and stored.size == len(data)
    assert store.path_for(sha) == tmp_path / "payloads" / sha[:2] / sha[2:]
    with store.open(sha) as f:
        assert f.read() == data
    with pytest.raises(PayloadTooLarge):
        store.write_chunks([data], limit=1000)
    assert list(store.tmp_dir.iterdir()) == []  # the refused upload left nothing behind
    with pytest.raises(ValueError):
        store.path_for("../../etc/passwd")


def test_start_assigns_phases_in_device_order(db: Database) -> None:
    with db.session() as s:
        tid = tenants.create_tenant(s, "ph", "Ph")[0].id
        for i in range(20):
            device_store.register_device(s, tid, validate_device(f"d{i:02d}", VENDOR, CLASS_A, {}))
    mid = _manifest(db, tid)
    policy = {"order": "registration", "phases": [{"until": "10%"}, {"until": "50%"}, {"until": "100%"}]}
    with db.session() as s:
        cid = campaigns.create_campaign(s, tid, mid, launch.draft("staged", "", policy)).id
        campaigns.start_campaign(s, tid, cid, launch.start_plan)
    with db.session() as s:
        rows = s.execute(
            select(Device.name, Deployment.phase)
            .join(Device, Device.id == Deployment.device_id)
            .where(Deployment.campaign_id == cid)
            .order_by(Device.id)
        ).all()
    assert [p for _n, p in rows] == [0] * 2 + [1] * 8 + [2] * 10


def test_start_fills_rollout_groups_then_a_seeded_shuffle(db: Database) -> None:
    with db.session() as s:
        tid = tenants.create_tenant(s, "gr", "Gr")[0].id
        for i in range(40):
            ring = {0: "canary", 1: "beta"}.get(i % 10, "main")
            device_store.register_device(
                s, tid, validate_device(f"d{i:02d}", VENDOR, CLASS_A, {"ring": ring})
            )
    mid = _manifest(db, tid)
    policy = {
        "phases": [
            {"name": "canary", "filter": 'tag.ring == "canary"'},
            {"filter": 'tag.ring in ["canary", "beta"]'},
            {"size": 5},
            {},
        ]
    }
    with db.session() as s:
        cid = campaigns.create_campaign(s, tid, mid, launch.draft("groups", "", policy)).id
        campaigns.start_campaign(s, tid, cid, launch.start_plan)
    with db.session() as s:
        rows = s.execute(
            select(Device.id, Device.tags, Deployment.phase)
            .join(Device, Device.id == Deployment.device_id)
            .where(Deployment.campaign_id == cid)
            .order_by(Device.id)
        ).all()
        reason = s.scalars(select(CampaignEvent.reason).where(CampaignEvent.campaign_id == cid)).all()[-1]
    by_phase: dict[int, list[str]] = {}
    for r in rows:
        by_phase.setdefault(r.phase, []).append(r.tags["ring"])
    assert by_phase[0] == ["canary"] * 4 and by_phase[1] == ["beta"] * 4  # first matching group wins
    assert len(by_phase[2]) == 5 and len(by_phase[3]) == 27 and "canary" not in by_phase[2] + by_phase[3]
    # the count phase is a seeded shuffle of the rest: the one the rules draw for this campaign
    members = [Member(r.id, {"canary": 0, "beta": 1}.get(r.tags["ring"])) for r in rows]
    expected = launch.start_plan(launch.stored_policy(policy), len(rows), 0.0).assign(members, cid)
    assert {r.id: r.phase for r in rows} == expected
    rest = [r.id for r in rows if r.tags["ring"] == "main"]
    assert sorted(i for i, p in expected.items() if p == 2) != rest[:5]
    assert reason == f"started with 40 devices; phases filled in a shuffle seeded {cid}"


def test_device_history_is_trimmed_to_a_bound(db: Database) -> None:
    from datetime import UTC, datetime

    from fwcm.store import device_state as ds
    from fwcm.store.models import DeviceEvent

    with db.session() as s:
        for device in (1, 2):
            for i in range(ds.HISTORY_PER_DEVICE + 7):
                s.add(
                    DeviceEvent(
                        tenant_id=1,
                        campaign_id=1,
                        device_id=device,
                        at=datetime.now(UTC),
                        state="notified",
                        result=i,
                    )
                )
    with db.session() as s:
        assert ds.trim_history(s) == 14
    with db.session() as s:
        kept = s.execute(
            select(DeviceEvent.device_id, func.min(DeviceEvent.result), func.count())
            .group_by(DeviceEvent.device_id)
            .order_by(DeviceEvent.device_id)
        ).all()
    # the newest events stay: results 7 .. 56 for each device
    assert [tuple(r) for r in kept] == [(1, 7, ds.HISTORY_PER_DEVICE), (2, 7, ds.HISTORY_PER_DEVICE)]


_EVENT_ROWS = 3000


def test_execute_many_matches_what_the_orm_reads_back(db: Database) -> None:
    """Rows written through execute_many (one driver executemany) read back through the ORM
    exactly as written, dates included (SQLite stores them as text), with a shared value and a
    parameter used twice in one statement."""
    from datetime import UTC, datetime, timedelta

    from sqlalchemy import Table, bindparam, update

    from fwcm.store.db import execute_many
    from fwcm.store.deployments import _EVENT_INSERT as add  # the statement ingest runs
    from fwcm.store.models import DeviceEvent

    table = DeviceEvent.__table__
    assert isinstance(table, Table)
    now = datetime.now(UTC).replace(microsecond=123456)
    rows = [
        {
            "t": 1,
            "c": 7,
            "d": i,
            "u": now if i % 3 else now - timedelta(seconds=i),
            "st": "notified",
            "r": i,
            "dt": None if i % 2 else f"detail {i}",
        }
        for i in range(_EVENT_ROWS)
    ]
    with db.session() as s:
        execute_many(s.connection(), add, rows)
    # result = :r where result < :r (the same name twice), on every other row
    bump = (
        update(table)
        .where(table.c.device_id == bindparam("d"), table.c.result < bindparam("r"))
        .values(result=bindparam("r"), state=bindparam("st"))
    )
    with db.session() as s:
        execute_many(
            s.connection(),
            bump,
            [{"d": i, "r": i + 1, "st": "downloading"} for i in range(0, _EVENT_ROWS, 2)],
        )
        execute_many(s.connection(), bump, [])  # nothing to do is fine
    with db.read() as s:
        got = {
            e.device_id: (e.at, e.detail, e.result, e.state)
            for e in s.scalars(select(DeviceEvent).where(DeviceEvent.campaign_id == 7))
        }
    assert len(got) == _EVENT_ROWS
    for row in rows:
        at, detail, result, state = got[row["d"]]
        assert (at if at.tzinfo else at.replace(tzinfo=UTC)) == row["u"]
        assert detail == row["dt"]
        bumped = row["d"] % 2 == 0
        assert (result, state) == ((row["r"] + 1, "downloading") if bumped else (row["r"], "notified"))


def test_execute_many_refuses_fixed_values(db: Database) -> None:
    from sqlalchemy import Table, bindparam, update

    from fwcm.store.db import execute_many
    from fwcm.store.models import DeviceEvent

    table = DeviceEvent.__table__
    assert isinstance(table, Table)
    stmt = update(table).where(table.c.id == bindparam("i")).values(state="cancelled")
    with db.session() as s, pytest.raises(ValueError, match="fixed value"):
        execute_many(s.connection(), stmt, [{"i": 1}])
