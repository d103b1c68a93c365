"""The quarterly disaster-recovery drill: `regal-backup drill` in a fresh process that uses nothing but
the policy, the keys and the repository (no Dagster state), RTO and RPO measured."""

import json
import subprocess
import sys

from dagster import (
    Failure,
    JobDefinition,
    MetadataValue,
    OpExecutionContext,
    ScheduleDefinition,
    job,
    op,
)

from ...engine.policy import Policy
from ..fleet import fleet_tags
from ..resources import drill_schedule_status

DRILL_JOB = "dr_drill_job"


def build_drill_job(policy: Policy, policy_path: str) -> tuple[JobDefinition, ScheduleDefinition]:
    @op(description="Runs `regal-backup drill` in a fresh process: nothing but the policy, keys and repository.")
    def dr_drill(context: OpExecutionContext) -> None:
        done = subprocess.run([sys.executable, "-m", "regal_dagster.cli", "drill", "--json", "--policy", policy_path],
                              capture_output=True, text=True, check=False)
        if done.returncode not in (0, 3) or not done.stdout.strip():
            raise Failure(f"the drill could not run: {done.stderr.strip()[-1500:]}")
        record = json.loads(done.stdout)
        context.log.info(f"drill {record['drill_id']}: RTO {record['rto_seconds']:.1f}s (target "
                         f"{record['rto_target_seconds']:.0f}s), worst RPO {record['rpo_seconds']} s (target "
                         f"{record['rpo_target_seconds']:.0f}s): {'PASSED' if record['passed'] else 'FAILED'}")
        if not record["passed"]:
            raise Failure("the disaster-recovery drill missed its targets", metadata={
                "drill": MetadataValue.json(record)})

    @job(name=DRILL_JOB, description="Quarterly disaster-recovery drill: every target rebuilt from the "
                                          "repository alone, RTO and RPO measured.")
    def dr_drill_job() -> None:
        dr_drill()

    drill_schedule = ScheduleDefinition(name="quarterly_dr_drill", job=dr_drill_job,
                                        cron_schedule=policy.restore_tests.drill_cron, execution_timezone="UTC",
                                        default_status=drill_schedule_status(policy),
                                        tags=fleet_tags(policy, None, "drill"),
                                        description="The quarterly disaster-recovery drill "
                                                    f"({policy.restore_tests.drill_cron} UTC): every target rebuilt "
                                                    "from the repository alone, RTO and RPO measured.")
    return dr_drill_job, drill_schedule
