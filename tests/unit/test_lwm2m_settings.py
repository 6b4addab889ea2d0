"""LwM2M settings: off unless FWCM_LWM2M_BIND is set; Package URIs default to the CoAP URL."""

from __future__ import annotations

import pytest

from fwcm.config import Settings


def test_lwm2m_is_off_by_default(monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> None:
    monkeypatch.delenv("FWCM_LWM2M_BIND", raising=False)
    monkeypatch.delenv("FWCM_LWM2M_PACKAGE_URL", raising=False)
    monkeypatch.setenv("FWCM_COAP_BIND", "10.0.0.1:5683")
    s = Settings.from_env(data_dir=tmp_path)
    assert s.lwm2m_port == 0
    assert s.lwm2m_package_url == "coap://10.0.0.1:5683"


def test_lwm2m_bind_and_package_url(monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> None:
    monkeypatch.setenv("FWCM_LWM2M_BIND", "0.0.0.0:5783")
    monkeypatch.setenv("FWCM_LWM2M_PACKAGE_URL", "http://fw.example:8080/")
    s = Settings.from_env(data_dir=tmp_path)
    assert (s.lwm2m_host, s.lwm2m_port) == ("0.0.0.0", 5783)
    assert s.lwm2m_package_url == "http://fw.example:8080"
    monkeypatch.setenv("FWCM_LWM2M_BIND", "nonsense")
    with pytest.raises(ValueError, match="FWCM_LWM2M_BIND"):
        Settings.from_env(data_dir=tmp_path)
