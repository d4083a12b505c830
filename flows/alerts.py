"""Alerts for the operations team: Prefect automations, created with the deployments (`hfbatch serve`,
`hfbatch deploy`), that send a message through a Prefect notification block when

- a run of one of the deployments ends Failed, Crashed or TimedOut (`run-failed`),
- batch inference reports drift (the event `hfbatch.predictions.drifted`, `drift`),
- a new version was registered and not promoted (`hfbatch.model.rejected`, `rejected`),
- a batch-inference run has not finished within the deadline after it started, or after it became
  Late because nothing picked it up (a proactive trigger, `late-inference`).

Each message names the flow run and links to it in the UI. The automations are looked up by name and
updated, so creating them again never duplicates them. The block is `<type slug>/<name>` from the
settings (`HFBATCH_ALERT_BLOCK`, default `custom-webhook/hfbatch-alerts`): any notification block
(Slack, Teams, e-mail, ...) saved under that name; with `HFBATCH_ALERT_WEBHOOK_URL` a custom-webhook
block is saved there with that URL (JSON `{"subject": ..., "body": ...}`).
"""
from __future__ import annotations

from datetime import timedelta
from uuid import UUID

from prefect.automations import AutomationCore, EventTrigger, Posture, SendNotification
from prefect.client.orchestration import get_client
from prefect.exceptions import ObjectNotFound
from prefect.logging import get_logger

from hfbatch.tasks import events
from hfbatch.tasks.core.errors import ConfigError
from hfbatch.tasks.core.settings import Settings

logger = get_logger("hfbatch.alerts")

PREFIX = "hfbatch: "  # the automations' names: what "already there" is looked up by
FAILED = ("Failed", "Crashed", "TimedOut")  # the state names a failed run ends in
TERMINAL = ("Completed", "Cancelled", *FAILED)
LINK = "{{ flow_run|ui_url }}\n"


def check_block(settings: Settings) -> None:
    """The alert settings, checked before anything is deployed: the block is `<type slug>/<name>`, a
    webhook URL can only fill a custom-webhook block, the deadline is one Prefect accepts."""
    slug, sep, name = settings.alert_block.partition("/")
    if not (sep and slug and name):
        raise ConfigError(f"HFBATCH_ALERT_BLOCK must be <block type slug>/<block name>, e.g. "
                          f"custom-webhook/hfbatch-alerts or slack-webhook/ops; got {settings.alert_block!r}")
    if settings.alert_webhook_url and slug != "custom-webhook":
        raise ConfigError(f"HFBATCH_ALERT_WEBHOOK_URL fills a custom-webhook block, but HFBATCH_ALERT_BLOCK is a "
                          f"{slug} block: create that block yourself (prefect block create {slug})")
    if settings.inference_deadline < 10:
        raise ConfigError(f"the batch-inference deadline must be at least 10 seconds (Prefect's least for a "
                          f"proactive trigger); got {settings.inference_deadline}")


def notification_block(settings: Settings) -> UUID | None:
    """The id of the notification block the alerts send through: saved first from the webhook URL if one
    is set; None if there is none and none was asked for by name (alerts are then not set up)."""
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    check_block(settings)
    slug, _, name = settings.alert_block.partition("/")
    if settings.alert_webhook_url:
        block = CustomWebhookNotificationBlock(name=name, url=settings.alert_webhook_url,
                                               json_data={"subject": "{{subject}}", "body": "{{body}}"})
        saved: UUID = block.save(name, overwrite=True)  # type: ignore[assignment]  # sync here
        return saved
    with get_client(sync_client=True) as client:
        try:
            document = client.read_block_document_by_name(name, block_type_slug=slug, include_secrets=False)
        except ObjectNotFound:
            if "alert_block" in settings.model_fields_set:
                raise ConfigError(f"no notification block {settings.alert_block} in the Prefect API: create it "
                                  "(prefect block create ...) or set HFBATCH_ALERT_WEBHOOK_URL") from None
            return None
    if "notify" not in (document.block_schema.capabilities if document.block_schema else []):
        raise ConfigError(f"block {settings.alert_block} is not a notification block (it cannot notify)")
    return document.id


def automations(deployments: dict[str, UUID], block: UUID, deadline: timedelta) -> list[AutomationCore]:
    """The four alerts for the deployments `{name: id}` (the late-run alert for `batch-inference`).
    Their messages are Jinja templates the server renders: `flow_run` is the run the event is about
    (or, for an hfbatch event, the run that emitted it), `flow_run|ui_url` its page in the UI."""
    def notify(subject: str, body: str) -> list[SendNotification]:
        return [SendNotification(block_document_id=block, subject=subject, body=body)]

    def of(*ids: UUID) -> dict:
        return {"prefect.resource.role": "deployment", "prefect.resource.id": [f"prefect.deployment.{i}" for i in ids]}

    flow_runs = {"prefect.resource.id": "prefect.flow-run.*"}
    alerts = [
        AutomationCore(
            name=f"{PREFIX}run-failed", description="A run of an hfbatch deployment failed, crashed or timed out",
            trigger=EventTrigger(expect={f"prefect.flow-run.{s}" for s in FAILED}, match=flow_runs,
                                 match_related=of(*deployments.values()), posture=Posture.Reactive),
            actions=notify("hfbatch: flow run {{ flow_run.name }} {{ flow_run.state.name }}",
                           "Flow run {{ flow_run.name }} of deployment {{ deployment.name }} ({{ flow.name }}) is "
                           "{{ flow_run.state.name }}: {{ flow_run.state.message }}\n" + LINK)),
        AutomationCore(
            name=f"{PREFIX}drift", description="Batch inference reported drift in its predictions",
            trigger=EventTrigger(expect={events.DRIFTED}, posture=Posture.Reactive),
            actions=notify("hfbatch: predictions drifted in flow run {{ flow_run.name }}",
                           "{{ event.resource.name or event.resource.id }}: predictions drifted in flow run "
                           "{{ flow_run.name }}\n{{ event.payload | tojson }}\n" + LINK)),
        AutomationCore(
            name=f"{PREFIX}rejected", description="A new version was registered and not promoted",
            trigger=EventTrigger(expect={events.REJECTED}, match={"prefect.resource.id": "hfbatch.model.*"},
                                 posture=Posture.Reactive),
            actions=notify("hfbatch: {{ event.payload.name }} v{{ event.payload.version }} not promoted "
                           "(flow run {{ flow_run.name }})",
                           "{{ event.payload.name }} v{{ event.payload.version }} was registered and not promoted; "
                           "the champion stays v{{ event.payload.champion }}: {{ event.payload.reason }}\n"
                           "Flow run {{ flow_run.name }}\n" + LINK)),
    ]
    if "batch-inference" in deployments:
        seconds = int(deadline.total_seconds())
        # per flow run: the window opens at its first Late, Pending or Running state and closes at a
        # terminal one (a failure is the run-failed alert's news); no terminal state in time: alert
        alerts.append(AutomationCore(
            name=f"{PREFIX}late-inference",
            description=f"A batch-inference run did not finish within {seconds} s of starting or becoming late",
            trigger=EventTrigger(after={f"prefect.flow-run.{s}" for s in ("Late", "Pending", "Running")},
                                 expect={f"prefect.flow-run.{s}" for s in TERMINAL}, match=flow_runs,
                                 match_related=of(deployments["batch-inference"]), for_each={"prefect.resource.id"},
                                 posture=Posture.Proactive, threshold=1, within=deadline),
            actions=notify(f"hfbatch: batch-inference run {{{{ flow_run.name }}}} not completed within {seconds} s",
                           "Batch-inference flow run {{ flow_run.name }} has not completed "
                           f"{seconds} s after it started or became late (state: {{{{ flow_run.state.name }}}})\n"
                           + LINK)))
    return alerts


def ensure_alerts(deployments: dict[str, UUID], block: UUID | None, settings: Settings) -> list[str]:
    """Create or update the alerts of `deployments` (`{name: id}`) sending through `block`
    (`notification_block`); the names of those set up (none without a block, which is logged)."""
    if block is None:
        logger.warning("alerts not set up: no notification block %s (set HFBATCH_ALERT_WEBHOOK_URL, or save a "
                       "notification block under that name: see deployments/README.md)", settings.alert_block)
        return []
    wanted = automations(deployments, block, timedelta(seconds=settings.inference_deadline))
    with get_client(sync_client=True) as client:
        for automation in wanted:
            found = client.read_automations_by_name(automation.name)
            if found:
                client.update_automation(found[0].id, automation)
                for duplicate in found[1:]:  # two deploys at the same moment: keep one
                    client.delete_automation(duplicate.id)
            else:
                client.create_automation(automation)
    return [a.name for a in wanted]
