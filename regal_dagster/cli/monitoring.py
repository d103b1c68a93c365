"""The monitoring faces of the CLI: `metrics --cloudwatch`, `status --heartbeat`, `status --alert` (rendering only:
the engine publishes, pings and evaluates)."""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime

from ..engine.crypto import Keyring
from ..engine.errors import RegalError
from ..engine.policy import Policy
from ..engine.storage import Repository
from .output import Output, command_name


def publish_to_cloudwatch(policy: Policy, repo: Repository, keyring: Keyring, out: Output) -> int:
    from ..engine.cloudwatch import publish_repository

    with out.activity("reading the repository and publishing to CloudWatch"):
        published = publish_repository(policy, repo, keyring)
    out.result({"cloudwatch": published.to_json()},
               f"published {published.data_points} data points to CloudWatch namespace {published.namespace} in "
               f"{published.calls} call(s)" + (f" ({published.throttled} throttled and retried)"
                                                if published.throttled else ""))
    return 0


STATE_COMMANDS = {"status", "list", "show", "wal status", "prune", "check"}
"""Commands whose non-zero exit reports a state the alerts already carry (an RPO breached, ...), not a failure."""


def report_failure(args: argparse.Namespace, message: str, error: BaseException | None, code: int) -> None:
    """A failed command, to each Sentry channel of the policy (engine/channels/sentry.py): tagged with the
    command, the target and the backup id the command line names; waits at most the channel's flush_timeout."""
    from ..engine.policy import load_policy

    command = command_name(args)
    if error is None and command in STATE_COMMANDS:
        return
    try:
        policy = load_policy(args.policy)
    except RegalError:
        return  # no policy, no channel
    from ..engine.channels import sentry

    channels = [c for c in policy.alerts.channels if isinstance(c, sentry.SentryChannel)]
    if not channels:
        return

    target = getattr(args, "target", None)
    tags = {"command": command, "target": target if isinstance(target, str) else "",
            "backup_id": str(getattr(args, "backup_id", None) or ""), "exit_code": str(code), "source": "regal-backup"}
    for channel in channels:
        try:
            sentry.capture(channel, f"regal-backup {command} failed: {message}", tags, error=error,
                           fingerprint=["regal-backup", "cli", command, type(error).__name__ if error else str(code)],
                           secret_names=policy.secret_names())
            sentry.flush(channel)
        except Exception as exc:  # noqa: BLE001 - reporting never changes what the command did
            print(f"warning: the failure could not be reported to Sentry: {exc}", file=sys.stderr)


def watch_dagster(args: argparse.Namespace, policy: Policy, repo: Repository, keyring: Keyring, out: Output) -> int:
    """`status --heartbeat URL` (ping after reading the repository) and `status --alert` (the watchdog)."""
    from ..engine.status import repository_status
    from ..engine.watchdog import ping, state_path, watch

    now = datetime.now(UTC)
    if args.heartbeat:
        with out.activity("reading the repository"):
            status = repository_status(policy, repo, keyring, now, args.target)
        ping(args.heartbeat)
        out.result({"heartbeat": True, "rpo_breached": status.rpo_breached},
                   "read the repository and pinged the heartbeat URL"
                   + (f"; RPO BREACHED: {', '.join(status.rpo_breached)}" if status.rpo_breached else ""))
        return 0
    from .dagster_liveness import read_liveness

    result = watch(policy, repo, keyring, read_liveness(policy), now, state_path(policy))
    for failure in result.failures:
        out.warn(f"alert not delivered (tried again next run): {failure}")
    lines = ([f"DAGSTER DAEMON SILENT: {line}" for line in result.silent] or
             ["the Dagster daemon is alive: its sensors alert"])
    lines += [f"{sent['status']}: {sent['what']}" for sent in result.sent]
    lines.append(f"open watchdog alerts: {len(result.open)}")
    body = {"watchdog": result.to_json()}
    if result.silent and policy.monitoring.cloudwatch is not None:  # the cloudwatch_metrics sensor is silent too
        published, problem = _publish_bounded(policy, repo, keyring, CLOUDWATCH_WAIT_SECONDS)
        body["cloudwatch"] = published
        if problem:
            out.warn(f"CloudWatch not updated (the alerts above are unaffected): {problem}")
        else:
            lines.append(f"published {published['data_points']} data points to CloudWatch (the Dagster sensor "
                         "cloudwatch_metrics is silent)")
    out.result(body, "\n".join(lines))
    return 3 if result.silent else 0


CLOUDWATCH_WAIT_SECONDS = 30.0  # the watchdog's publication never holds the run (a cron job) longer than this


def _publish_bounded(policy: Policy, repo: Repository, keyring: Keyring, wait: float) -> tuple[dict, str | None]:
    """The metrics published to CloudWatch by a thread the watchdog waits for at most `wait` seconds (throttling and
    an unreachable endpoint are retried and timed out by engine/cloudwatch.py; the thread is a daemon, so a run
    never outlives its cron slot for it): (what was published, or null; what went wrong, or None)."""
    import threading

    from ..engine.cloudwatch import publish_repository

    outcome: dict[str, object] = {}

    def publish() -> None:
        try:
            outcome["published"] = publish_repository(policy, repo, keyring).to_json()
        except Exception as exc:  # noqa: BLE001 - publishing never changes what the watchdog did
            outcome["problem"] = exc.message if isinstance(exc, RegalError) else f"{type(exc).__name__}: {exc}"

    worker = threading.Thread(target=publish, name="cloudwatch", daemon=True)
    worker.start()
    worker.join(wait)
    if worker.is_alive():
        return {}, f"CloudWatch did not answer within {wait:g} s"
    published = outcome.get("published")
    return (published if isinstance(published, dict) else {}), (str(outcome["problem"]) if "problem" in outcome
                                                                  else None)
