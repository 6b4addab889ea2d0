"""Campaigns of a tenant: create a draft, start, pause, resume, cancel, and follow its progress."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query

from fwcm.api import schemas as sc
from fwcm.api.deps import MANAGEMENT_ERRORS, Notify, Tenant, router
from fwcm.rollout import launch
from fwcm.store import campaigns
from fwcm.store import consent as cq
from fwcm.store.db import Database

CHANGES = {
    "pause": "Stop sending new notices; devices already updating finish.",
    "resume": "Continue a paused campaign.",
    "cancel": "Withdraw the update from devices that have not started installing.",
}
"""The operator's transitions of a running campaign, each ``POST /campaigns/{id}/<action>``."""


def create_router(db: Database, notify: Notify) -> APIRouter:
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

    @api.get("/campaigns", response_model=list[sc.CampaignOut], tags=["campaigns"])
    def list_campaigns(t: Tenant, state: str | None = None) -> list[sc.CampaignOut]:
        with db.read() as s:
            return [sc.CampaignOut.of(c) for c in campaigns.list_campaigns(s, t.id, state)]

    @api.get("/campaigns/{campaign_id}", response_model=sc.CampaignOut, tags=["campaigns"])
    def get_campaign(campaign_id: sc.RowId, t: Tenant) -> sc.CampaignOut:
        with db.read() as s:
            return sc.CampaignOut.of(campaigns.get_campaign(s, t.id, campaign_id))

    @api.post("/campaigns/{campaign_id}/start", response_model=sc.CampaignOut, tags=["campaigns"])
    def start_campaign(
        campaign_id: sc.RowId, t: Tenant, body: sc.CampaignStartIn | None = None
    ) -> sc.CampaignOut:
        """Freeze the devices matching the filter and start the rollout. A filter that matches no
        device is refused (409) unless the campaign is dynamic or the body says ``allow_empty``."""
        allow_empty = body is not None and body.allow_empty
        with db.session() as s:
            c = campaigns.start_campaign(s, t.id, campaign_id, launch.start_plan, allow_empty=allow_empty)
            warnings = campaigns.filter_warnings(s, t.id, c.filter)
            out = sc.CampaignOut.of(c).model_copy(update={"warnings": warnings})
        notify.campaign_changed(campaign_id)
        return out

    def _change(action: str) -> Any:
        def change(campaign_id: sc.RowId, t: Tenant) -> sc.CampaignOut:
            with db.session() as s:
                out = sc.CampaignOut.of(campaigns.change_campaign(s, t.id, campaign_id, action))
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

    @api.get("/campaigns/{campaign_id}/stats", response_model=sc.CampaignStats, tags=["campaigns"])
    def campaign_stats(campaign_id: sc.RowId, t: Tenant) -> sc.CampaignStats:
        with db.read() as s:
            return sc.CampaignStats(**campaigns.campaign_stats(s, t.id, campaign_id, launch.phase_names))

    @api.get("/campaigns/{campaign_id}/devices", response_model=sc.DeploymentPage, tags=["campaigns"])
    def campaign_devices(
        campaign_id: sc.RowId,
        t: Tenant,
        state: str | None = None,
        limit: Annotated[int, Query(ge=1, le=10000)] = 100,
        offset: sc.Offset = 0,
    ) -> sc.DeploymentPage:
        with db.session() as s:
            total, rows = campaigns.campaign_devices(s, t.id, campaign_id, state, limit, offset)
            return sc.DeploymentPage(
                total=total, limit=limit, offset=offset, items=[sc.DeploymentOut(**r) for r in rows]
            )

    @api.get("/campaigns/{campaign_id}/events", response_model=list[sc.CampaignEventOut], tags=["campaigns"])
    def campaign_events(campaign_id: sc.RowId, t: Tenant) -> list[sc.CampaignEventOut]:
        """Every state change of the campaign with its time and reason."""
        with db.read() as s:
            return [sc.CampaignEventOut.of(e) for e in campaigns.campaign_events(s, t.id, campaign_id)]

    return api
