"""Campaigns of a tenant: create a draft (or clone one), start, pause, resume, cancel, retry its
failed devices, delete it once ended, and follow its progress."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response

from fwcm.api import schemas as sc
from fwcm.api.deps import MANAGEMENT_ERRORS, Notify, Tenant, router
from fwcm.rollout import launch, planner
from fwcm.server.deltas import DeltaMaker
from fwcm.server.signing import Caller
from fwcm.store import campaigns, progress
from fwcm.store import consent as cq
from fwcm.store import deltas as dz
from fwcm.store import leases as lq
from fwcm.store.db import Database

CHANGES = {
    "pause": "Stop sending new notices; devices already updating finish.",
    "resume": "Continue a paused campaign, or a stopped one after review: the failures that "
    "stopped it (and the current phase's success shortfall) are accepted, later ones count again.",
    "cancel": "Withdraw the update from devices that have not started installing.",
}
"""The operator's transitions of a running campaign, each ``POST /campaigns/{id}/<action>``."""


def create_router(db: Database, notify: Notify, deltas: DeltaMaker) -> APIRouter:
    api = router(*MANAGEMENT_ERRORS)

    @api.post("/campaigns", response_model=sc.CampaignOut, status_code=201, tags=["campaigns"])
    def create_campaign(body: sc.CampaignIn, t: Tenant) -> sc.CampaignOut:
        """A draft campaign: a manifest, a device filter (checked now) and a rollout policy."""
        draft = launch.draft(
            body.name,
            body.filter,
            body.policy,
            attestation=body.attestation,
            consent=body.consent,
            requester=t.name,
        )
        with db.session() as s:
            c = campaigns.create_campaign(s, t.id, body.manifest_id, draft)
            warnings = campaigns.filter_warnings(s, t.id, c.filter)
            return sc.CampaignOut.of(c).model_copy(update={"warnings": warnings})

    @api.get("/campaigns/{campaign_id}/accounting", response_model=sc.AccountingOut, tags=["campaigns"])
    def campaign_accounting(campaign_id: sc.RowId, t: Tenant) -> sc.AccountingOut:
        """Usage reported by the installed software of a campaign, per device."""
        with db.read() as s:
            campaigns.get_campaign(s, t.id, campaign_id)
            rows = [sc.AccountingRow(**r) for r in cq.accounting_report(s, t.id, campaign_id)]
        return sc.AccountingOut(
            campaign=campaign_id,
            devices=rows,
            total_uses=sum(r.uses for r in rows),
            reporting=len(rows),
            removed=sum(1 for r in rows if r.removed),
        )

    @api.get("/campaigns", response_model=sc.CampaignPage, tags=["campaigns"])
    def list_campaigns(
        t: Tenant, state: str | None = None, limit: sc.Limit = 100, offset: sc.Offset = 0
    ) -> sc.CampaignPage:
        """The tenant's campaigns, oldest first."""
        with db.read() as s:
            total, rows = campaigns.list_campaigns(s, t.id, state, limit, offset)
            return sc.CampaignPage.of(total, limit, offset, [sc.CampaignOut.of(c) for c in rows])

    @api.get("/campaigns/{campaign_id}", response_model=sc.CampaignOut, tags=["campaigns"])
    def get_campaign(campaign_id: sc.RowId, t: Tenant) -> sc.CampaignOut:
        with db.read() as s:
            return sc.CampaignOut.of(campaigns.get_campaign(s, t.id, campaign_id))

    @api.post("/campaigns/{campaign_id}/start", response_model=sc.CampaignOut, tags=["campaigns"])
    def start_campaign(
        campaign_id: sc.RowId, t: Tenant, body: sc.CampaignStartIn | None = None
    ) -> sc.CampaignOut:
        """Freeze the devices matching the filter and start the rollout. A filter that matches no
        device is refused (409) unless the campaign is dynamic or the body says ``allow_empty``.
        A policy with ``delta`` first gets the patches its devices' images need (made once, kept)."""
        allow_empty = body is not None and body.allow_empty
        plan = deltas.prepare(Caller(t.id, t.key_name, t.role), campaign_id)
        with db.session() as s:
            c = campaigns.start_campaign(s, t.id, campaign_id, launch.start_plan, allow_empty=allow_empty)
            if plan is not None:
                dz.assign(s, c.id, t.id, [(src.delta_id, src.base) for src in plan.given() if src.delta_id])
                lq.add_campaign_event(s, c.id, t.id, c.state, plan.describe())
            warnings = campaigns.filter_warnings(s, t.id, c.filter)
            out = sc.CampaignOut.of(c).model_copy(update={"warnings": warnings})
        notify.campaign_changed(campaign_id)
        return out

    def _change(action: str) -> Any:
        def change(campaign_id: sc.RowId, t: Tenant) -> sc.CampaignOut:
            with db.session() as s:
                c = campaigns.change_campaign(s, t.id, campaign_id, action, review=planner.review)
                out = sc.CampaignOut.of(c)
            notify.campaign_changed(campaign_id)
            return out

        change.__name__ = f"{action}_campaign"
        change.__doc__ = CHANGES[action]
        return change

    for action in CHANGES:
        api.add_api_route(
            f"/campaigns/{{campaign_id}}/{action}",
            _change(action),
            methods=["POST"],
            response_model=sc.CampaignOut,
            tags=["campaigns"],
        )

    @api.post(
        "/campaigns/{campaign_id}/clone", response_model=sc.CampaignOut, status_code=201, tags=["campaigns"]
    )
    def clone_campaign(campaign_id: sc.RowId, t: Tenant, body: sc.CloneIn | None = None) -> sc.CampaignOut:
        """A new draft with the same manifest, filter, policy and rules (named "… (copy)" unless
        a name is given)."""
        with db.session() as s:
            source = campaigns.get_campaign(s, t.id, campaign_id)
            name = launch.clone_name(body.name if body else None, source.name)
            return sc.CampaignOut.of(campaigns.clone_campaign(s, t.id, campaign_id, name))

    @api.post("/campaigns/{campaign_id}/retry", response_model=sc.RetryOut, tags=["campaigns"])
    def retry_campaign(campaign_id: sc.RowId, t: Tenant) -> sc.RetryOut:
        """A new attempt for the failed and timed-out devices of a running, paused, stopped or
        completed campaign (an ended one runs again); reports of their old attempt are ignored."""
        with db.session() as s:
            c, retried = campaigns.retry_failed(s, t.id, campaign_id)
            out = sc.RetryOut(campaign=sc.CampaignOut.of(c), retried=retried)
        notify.campaign_changed(campaign_id)
        return out

    @api.delete("/campaigns/{campaign_id}", status_code=204, response_class=Response, tags=["campaigns"])
    def delete_campaign(campaign_id: sc.RowId, t: Tenant) -> Response:
        """Delete a draft or an ended campaign with its deployments and events; a scheduled,
        running or paused one is refused (409: cancel it first)."""
        with db.session() as s:
            campaigns.delete_campaign(s, t.id, campaign_id)
        return Response(status_code=204)

    @api.get("/campaigns/{campaign_id}/stats", response_model=sc.CampaignStats, tags=["campaigns"])
    def campaign_stats(campaign_id: sc.RowId, t: Tenant) -> sc.CampaignStats:
        with db.read() as s:
            return sc.CampaignStats(
                **progress.campaign_stats(s, t.id, campaign_id, launch.phase_names, launch.pace)
            )

    @api.get("/campaigns/{campaign_id}/devices", response_model=sc.DeploymentPage, tags=["campaigns"])
    def campaign_devices(
        campaign_id: sc.RowId,
        t: Tenant,
        state: str | None = None,
        limit: sc.Limit = 100,
        offset: sc.Offset = 0,
    ) -> sc.DeploymentPage:
        with db.session() as s:
            total, rows = progress.campaign_devices(s, t.id, campaign_id, state, limit, offset)
            return sc.DeploymentPage.of(total, limit, offset, [sc.DeploymentOut(**r) for r in rows])

    @api.get("/campaigns/{campaign_id}/events", response_model=sc.CampaignEventPage, tags=["campaigns"])
    def campaign_events(
        campaign_id: sc.RowId, t: Tenant, limit: sc.Limit = 1000, offset: sc.Offset = 0
    ) -> sc.CampaignEventPage:
        """Every state change of the campaign with its time and reason, oldest first."""
        with db.read() as s:
            total, rows = progress.campaign_events(s, t.id, campaign_id, limit, offset)
            return sc.CampaignEventPage.of(total, limit, offset, [sc.CampaignEventOut.of(e) for e in rows])

    return api
