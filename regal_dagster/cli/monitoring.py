"""The monitoring faces of the CLI: `metrics --cloudwatch`, `status --heartbeat`, `status --alert` (rendering only:
the engine publishes, pings and evaluates)."""

from __future__ import annotations

from ..engine.crypto import Keyring
from ..engine.policy import Policy
from ..engine.storage import Repository
from .output import Output


def publish_to_cloudwatch(policy: Policy, repo: Repository, keyring: Keyring, out: Output) -> int:
    from ..engine.cloudwatch import publish_repository

    with out.activity("reading the repository and publishing to CloudWatch"):
        published = publish_repository(policy, repo, keyring)
    out.result({"cloudwatch": published.to_json()},
               f"published {published.data_points} data points to CloudWatch namespace {published.namespace} in "
               f"{published.calls} call(s)" + (f" ({published.throttled} throttled and retried)"
                                                if published.throttled else ""))
    return 0
