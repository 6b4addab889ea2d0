"""`fwcm demo --signing-service`: a release signed inside SoftHSM2 after a second key's approval
reaches every simulated device, which checks its chain to the operator root."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fwcm import keystore

pytestmark = pytest.mark.skipif(
    shutil.which("softhsm2-util") is None or not Path(keystore.SOFTHSM2_MODULE).exists(),
    reason="SoftHSM2 is not installed",
)


def test_signing_service_demo(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "fwcm.cli", "demo", "--signing-service", "--devices", "12", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["succeeded"] == 12 and result["device_results"] == {"success": 12}
    flow = result["signing_service"]
    assert flow["store"] == "pkcs11" and flow["requested_by"] == "ci"
    assert flow["state_before_approval"] == "pending" and flow["unsigned_before_approval"] is True
    assert "own approval does not count" in flow["self_approval_refused"]
    assert flow["approved_by"] == ["release-manager"] and flow["state"] == "signed"
    assert flow["audit_chain_ok"] is True
