"""Storage: SQL only, one module per aggregate over the models in ``models.py``: tenants, trust,
images, devices, factory, campaigns (and their progress), webhooks, audit, signing; for the engine
and ingest deployments, leases, notices, attestations, device state, consent and dead letters.

Functions run inside the caller's session; ``Database.session()`` (``db.py``) commits on success
and rolls back on any error, so nothing is half-stored.  Tenant functions take the caller's
``tenant_id`` and filter on it, so another tenant's object is indistinguishable from a missing
one (``NotFound``).  Values arrive checked by the pure modules (``fwcm.devices``,
``fwcm.inventory``, ``fwcm.rollout``); the store persists them.
"""
