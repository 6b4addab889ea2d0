"""Conformance kit for devices that speak fwcm's own protocol (``docs/protocol.md``).

``fwcm conformance`` plays the server against one device under test, over MQTT (a broker the user
names) or CoAP (the kit is the server the device observes), serves the payloads itself over HTTP
and CoAP, and drives the scenarios of :mod:`fwcm.conformance.scenarios`: a valid update, refusals
(bad signature, wrong class, rollback, tampered image), cancel, resumption after a broken transfer,
forged, duplicate and replayed notices, and the trial boot. :mod:`fwcm.conformance.vectors` writes
the byte-exact test vectors of ``docs/vectors``.
"""

from fwcm.conformance.kit import KitSettings
from fwcm.conformance.scenarios import SCENARIOS, Verdict, all_passed, run
from fwcm.conformance.wire import Device

__all__ = ["SCENARIOS", "Device", "KitSettings", "Verdict", "all_passed", "run"]
