"""The CoAP side of the notice-sender seam, where no network is needed: a device the server
cannot reach is not sent anything, and nothing is built for it."""

from __future__ import annotations

from fwcm.transport.coap import CoapTransport
from fwcm.transport.notices import NoticeSender


async def _nothing(*_args: object) -> None:
    return None


async def _allow(*_args: object) -> bool:
    return True


def test_coap_without_observation_or_address_reaches_nobody() -> None:
    transport = CoapTransport(("127.0.0.1", 0), lambda _m: None, _nothing, _nothing, authorize=_allow)
    assert isinstance(transport, NoticeSender)
    rendered: list[str] = []

    def render() -> bytes:
        rendered.append("built")
        return b"notice"

    assert transport.send_notice("acme", "dev-1", render) is False
    transport.addresses[("acme", "dev-1")] = "127.0.0.1:5999"  # known, but the server is not running
    assert transport.send_notice("acme", "dev-1", render) is False
    assert rendered == []
