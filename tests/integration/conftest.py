"""Fixtures shared by the integration tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from fwcm.transport.broker import start_broker


@pytest.fixture(scope="module")
def broker_url() -> Iterator[str]:
    """A broker on a free loopback port: Mosquitto when installed, else the embedded broker."""
    with start_broker() as broker:
        yield broker.url
