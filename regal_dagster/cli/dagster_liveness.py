"""What the Dagster instance of $DAGSTER_HOME says of its daemon: each watched daemon's newest heartbeat
(`DagsterInstance.get_daemon_heartbeats`) and the watched sensor's newest tick. Imported only by `status --alert`:
the one command that loads Dagster."""

from __future__ import annotations

import os
from datetime import UTC, datetime

from ..engine.errors import UsageError
from ..engine.policy import Policy
from ..engine.watchdog import DagsterLiveness


def read_liveness(policy: Policy) -> DagsterLiveness:
    home = os.environ.get("DAGSTER_HOME")
    if not home:
        raise UsageError("DAGSTER_HOME is not set: the watchdog reads the daemon's heartbeats from that instance",
                         "run it with the DAGSTER_HOME the Dagster daemon uses (docs/watchdog.md)")
    if not os.path.isdir(home):
        raise UsageError(f"DAGSTER_HOME {home} is not a directory", "give the Dagster daemon's DAGSTER_HOME")
    from dagster import DagsterInstance
    from dagster._core.scheduler.instigation import InstigatorType

    watchdog = policy.monitoring.watchdog
    with DagsterInstance.get() as instance:
        beats = instance.get_daemon_heartbeats()
        heartbeats = {daemon: (datetime.fromtimestamp(beats[daemon].timestamp, UTC) if daemon in beats else None)
                      for daemon in watchdog.daemons}
        evaluated, known = None, False
        if watchdog.sensor:
            for state in instance.all_instigator_state(instigator_type=InstigatorType.SENSOR):
                if state.name != watchdog.sensor:
                    continue
                known = True
                ticks = instance.get_ticks(state.instigator_origin_id, state.selector_id, limit=1)
                if ticks and (evaluated is None or ticks[0].timestamp > evaluated.timestamp()):
                    evaluated = datetime.fromtimestamp(ticks[0].timestamp, UTC)
    return DagsterLiveness(home, heartbeats, watchdog.sensor, evaluated, known)
