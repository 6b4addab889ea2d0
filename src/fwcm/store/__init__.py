"""Storage: SQL only, one module per aggregate (tenants, trust, images, devices, factory,
campaigns, deployments, consent, dead letters) over the models in ``models.py``.

Functions run inside the caller's session; ``Database.session()`` (``db.py``) commits on success
and rolls back on any error, so nothing is half-stored.  Tenant functions take the caller's
``tenant_id`` and filter on it, so another tenant's object is indistinguishable from a missing
one (``NotFound``).  Values arrive checked by the pure modules (``fwcm.devices``,
``fwcm.inventory``, ``fwcm.rollout``); the store persists them.
"""
