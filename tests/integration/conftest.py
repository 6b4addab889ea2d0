"""Fixtures shared by the integration tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from fwcm.transport.broker import Broker, start_broker


@pytest.fixture(scope="module")
def broker() -> Iterator[Broker]:
    """A broker on a free loopback port (Mosquitto when installed, else the embedded broker),
    admitting its service account and the device accounts a test gives it."""
    with start_broker() as b:
        yield b
