"""Import 100,000 devices from CSV and start a campaign over the 50,000 in region "eu".

Runs the real management API in-process (FastAPI TestClient over a fresh database) and prints
the seconds for the CSV import, the seconds for the campaign start (one INSERT … SELECT) and the
process's peak RSS.  SQLite in a temp directory by default; ``--database-url`` for PostgreSQL
(the bench works in a schema of its own and drops it afterwards).

    python bench/import_and_start.py [--devices 100000] [--database-url postgresql://…] [--json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import secrets
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text

from fwcm import manifest
from fwcm.api import create_app
from fwcm.config import Settings
from fwcm.store import tenants
from fwcm.store.db import Database, normalize_url


def make_csv(n: int, vendor: uuid.UUID, cls: uuid.UUID) -> str:
    lines = ["name,vendor_id,class_id,tags,sequence,version,transport,hardware_id,secret"]
    for i in range(n):
        region = "eu" if i % 2 == 0 else "us"
        transport = "coap" if i % 4 == 1 else "mqtt"
        lines.append(
            f"dev-{i:06d},{vendor},{cls},region={region};rack={i % 50},{i % 8},1.{i % 8},{transport},,"
        )
    return "\n".join(lines) + "\n"


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def run(database_url: str, data_dir: Path, n: int) -> dict[str, Any]:
    db = Database(database_url)
    db.migrate()
    settings = Settings(data_dir=data_dir, database_url=database_url)
    app = create_app(db, settings)
    with db.session() as s:
        _t, api_key = tenants.create_tenant(s, "bench", "Bench")
    client = TestClient(app, headers={"Authorization": f"Bearer {api_key}"})

    vendor = manifest.vendor_id_for_domain("bench.example")
    cls = manifest.class_id_for(vendor, "sensor")
    key = manifest.generate_private_key()
    pem = manifest.public_key_pem(key).decode()
    client.post("/api/v1/signers", json={"name": "bench", "public_key_pem": pem}).raise_for_status()
    image = b"bench firmware"
    info = manifest.ManifestInfo(
        1, vendor, cls, hashlib.sha256(image).digest(), len(image), ("http://127.0.0.1/p/x",)
    )
    r = client.post("/api/v1/manifests", content=manifest.build_envelope(info, key))
    r.raise_for_status()
    manifest_id = r.json()["id"]

    csv_text = make_csv(n, vendor, cls)
    t0 = time.perf_counter()
    r = client.post("/api/v1/devices/import", content=csv_text, headers={"Content-Type": "text/csv"})
    import_s = time.perf_counter() - t0
    r.raise_for_status()
    imported = r.json()["imported"]
    del r, csv_text

    body = {"name": "eu", "manifest_id": manifest_id, "filter": 'tag.region == "eu"'}
    cid = client.post("/api/v1/campaigns", json=body).json()["id"]
    t0 = time.perf_counter()
    r = client.post(f"/api/v1/campaigns/{cid}/start")
    start_s = time.perf_counter() - t0
    r.raise_for_status()
    total = r.json()["total"]
    client.close()
    db.dispose()
    return {
        "database": db.engine.dialect.name,
        "devices_imported": imported,
        "import_seconds": round(import_s, 3),
        "campaign_devices": total,
        "start_seconds": round(start_s, 3),
        "peak_rss_mib": round(peak_rss_mib(), 1),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, default=100_000)
    ap.add_argument("--database-url", help="PostgreSQL URL (default: a temporary SQLite file)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="fwcm-bench-") as tmp:
        data_dir = Path(tmp)
        if args.database_url:
            base = normalize_url(args.database_url)
            schema = f"bench_{secrets.token_hex(4)}"
            admin = create_engine(base, isolation_level="AUTOCOMMIT")
            with admin.connect() as c:
                c.execute(text(f'CREATE SCHEMA "{schema}"'))
            sep = "&" if "?" in base else "?"
            try:
                result = run(f"{base}{sep}options={quote(f'-csearch_path={schema}')}", data_dir, args.devices)
            finally:
                with admin.connect() as c:
                    c.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
                admin.dispose()
        else:
            result = run(f"sqlite:///{data_dir / 'bench.db'}", data_dir, args.devices)

    if args.json:
        print(json.dumps(result))
    else:
        print(f"database:        {result['database']}")
        print(f"import:          {result['devices_imported']} devices in {result['import_seconds']:.2f} s")
        print(
            f"campaign start:  {result['campaign_devices']} devices frozen in {result['start_seconds']:.2f} s"
        )
        print(f"peak RSS:        {result['peak_rss_mib']:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
