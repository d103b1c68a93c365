"""The Celery app of a zone's worker (fleet.executor: celery; docs/fleet.md):

    REGAL_POLICY=/etc/regal/regal_backup.yaml celery -A regal_dagster.defs.celery_worker worker \\
        -Q regal-<zone> -n <zone>@%h

It is dagster-celery's app (dagster_celery.app: the `execute_plan` task a step is sent as) with two things
from the policy: the broker (`fleet.broker`, a URL or the NAME of a variable holding it) and one queue per zone.
dagster-celery publishes a step to queue Q with the routing key `Q.execute_plan`; a queue Celery makes up for
`-Q Q` is bound by `Q` only, so the message would be dropped. Each zone's queue is declared here bound by that
key, on a durable direct exchange of its name: a step sent while the zone's worker is down waits in the queue."""

from __future__ import annotations

import os

from dagster_celery.app import app
from kombu import Exchange, Queue

from ..engine.errors import PolicyError
from ..engine.fleet import BROKER_ENV_NAME, celery_queue
from ..engine.policy import load_policy, policy_file


def zone_queues(zones: set[str]) -> list[Queue]:
    return [Queue(name, Exchange(name, type="direct"), routing_key=f"{name}.execute_plan")
            for name in sorted(celery_queue(zone) for zone in zones)]


def broker_url(broker: str) -> str:
    if not BROKER_ENV_NAME.fullmatch(broker):
        return broker
    if not (url := os.environ.get(broker)):
        raise PolicyError(str(policy_file(None)), [
            f"fleet.broker names the environment variable {broker}, which is not set: set it to the broker's URL"])
    return url


_policy = load_policy(policy_file(None))
app.conf.broker_url = broker_url(_policy.fleet.broker)
app.conf.result_backend = _policy.fleet.result_backend
app.conf.task_queues = [*app.conf.task_queues,
                        *zone_queues({_policy.zone_of(target) for target in _policy.targets})]

__all__ = ["app"]
