"""One evaluation of each repository-reading sensor at fleet size: a generated local repository of N `files`
targets (each a small file, BACKUPS good backups each, checked), then every sensor evaluated twice on one
Dagster instance (the first evaluation builds the cursor, the second is the steady state each minute).

    .venv/bin/python benchmarks/fleet_sensors.py --targets 500 --backups 2 [--dir /tmp/fleet500] [--s3]

The repository is kept in --dir and reused by the next run with the same size (generating it takes minutes).
With --s3 the sensors read an S3 repository instead: a moto server on 127.0.0.1 (as the tests start one) is
given a bucket holding a copy of every object of the local repository (same keys, same keyset), and the policy
points at it. The WAL watch sensor is not measured: what it costs is each postgres_cluster target's archived WAL
(listed and read per target) and a question to its server, and the generator cannot make a base backup and a WAL
archive per target without an archiving PostgreSQL server per target; targets with no WAL stored would measure
an empty listing, not the sensor.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SENSORS = ["rpo_watch", "backup_alerts", "backups_outside_dagster", "restore_test_new_backups"]


def generate(base: Path, targets: int, backups: int) -> Path:
    from regal_dagster.engine import crypto
    from regal_dagster.engine.backup import run_backup
    from regal_dagster.engine.checks import run_checks
    from regal_dagster.engine.policy import load_policy
    from regal_dagster.engine.repository_format import initialize
    from regal_dagster.engine.storage import open_repository

    policy_file = base / "regal_backup.yaml"
    done = base / f"generated-{targets}x{backups}"
    if done.exists():
        return policy_file
    base.mkdir(parents=True, exist_ok=True)
    (base / "master.key").write_text(crypto.generate_master_key())
    os.chmod(base / "master.key", 0o600)
    data = base / "data"
    data.mkdir(exist_ok=True)
    document = {"repository": {"url": "repository"},
                "encryption": {"keyset": "keyset.json", "master_key": {"file": "master.key"}},
                "targets": {}, "rpo": "1d"}
    for index in range(targets):
        name = f"store_{index:04d}"
        (data / f"{name}.conf").write_text(f"store = {index}\n" * 20)
        document["targets"][name] = {"kind": "files", "paths": [str(data / f"{name}.conf")]}
    policy_file.write_text(yaml.safe_dump(document))
    policy = load_policy(policy_file)
    keyring = crypto.create_keyset(policy)
    repo = open_repository(policy)
    initialize(repo, keyring)
    started = time.monotonic()
    for name in sorted(policy.targets):
        for _ in range(backups):
            result = run_backup(policy, name, "daily", repo=repo, keyring=keyring, trigger={"benchmark": "fleet"})
            run_checks(policy, repo, keyring, result.manifest.backup_id, trigger={"benchmark": "fleet"})
    print(f"generated {targets} targets x {backups} backups in {time.monotonic() - started:.0f} s", file=sys.stderr)
    done.touch()
    return policy_file


def to_s3(policy_file: Path) -> tuple[Path, object]:
    """A moto server holding a copy of the local repository, and a policy naming it (the server, to stop)."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    from regal_dagster.engine.policy import load_policy
    from regal_dagster.engine.storage import open_repository

    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
                        "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}.items():
        os.environ[name] = value
    logging.getLogger("werkzeug").addHandler(logging.NullHandler())
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    port = server.get_host_and_port()[1]
    endpoint = f"http://127.0.0.1:{port}"
    boto3.client("s3", region_name="us-east-1", endpoint_url=endpoint).create_bucket(Bucket="regal-fleet")
    document = yaml.safe_load(policy_file.read_text())
    document["repository"] = {"url": "s3://regal-fleet/repo", "endpoint_url": endpoint, "region": "us-east-1"}
    s3_policy = policy_file.with_name(f"regal_backup_s3_{port}.yaml")
    s3_policy.write_text(yaml.safe_dump(document))
    started = time.monotonic()
    local, remote = open_repository(load_policy(policy_file)), open_repository(load_policy(s3_policy))
    count = 0
    for stored in local.list(""):
        remote.put_bytes(stored.key, local.get_bytes(stored.key))
        count += 1
    print(f"copied {count} objects to {endpoint} in {time.monotonic() - started:.0f} s", file=sys.stderr)
    return s3_policy, server


def measure(policy_file: Path, sensors: list[str], most: int) -> tuple[dict[str, list[float]], set[str]]:
    """Per sensor: each evaluation's seconds, until one finds nothing new (the steady state of every minute) or
    `most` evaluations; and the sensors still finding something new at the last one (not caught up)."""
    import dagster as dg

    from regal_dagster.defs import build_definitions

    started = time.monotonic()
    defs = build_definitions(str(policy_file))
    dg.Definitions.validate_loadable(defs)
    times: dict[str, list[float]] = {"(code location load)": [time.monotonic() - started]}
    instance = dg.DagsterInstance.ephemeral()
    behind = set()
    for name in sensors:
        cursor = None
        for _ in range(most):
            context = dg.build_sensor_context(instance=instance, cursor=cursor, definitions=defs,
                                              resources=defs.resources)
            began = time.monotonic()
            result = defs.resolve_sensor_def(name)(context)
            times.setdefault(name, []).append(time.monotonic() - began)
            events = result.asset_events or [] if isinstance(result, dg.SensorResult) else []
            cursor = result.cursor if isinstance(result, dg.SensorResult) else context.cursor
            for event in events:  # as the daemon does: the events reach the instance
                if isinstance(event, dg.AssetMaterialization | dg.AssetObservation):
                    instance.report_runless_asset_event(event)
            if not events and len(times[name]) >= 2:
                break
        else:
            behind.add(name)
    return times, behind


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", type=int, default=500)
    parser.add_argument("--backups", type=int, default=2, help="good backups per target")
    parser.add_argument("--dir", type=Path, default=None, help="where the generated repository is kept")
    parser.add_argument("--s3", action="store_true", help="read the repository from a moto S3 server")
    parser.add_argument("--sensor", action="append", choices=SENSORS, help="measure only this sensor (repeatable)")
    parser.add_argument("--max-evaluations", type=int, default=40, help="per sensor, at most")
    args = parser.parse_args()
    base = args.dir or Path(f"/tmp/regal-fleet-{args.targets}x{args.backups}")
    policy_file = generate(base, args.targets, args.backups)
    server = None
    if args.s3:
        policy_file, server = to_s3(policy_file)
    os.environ["REGAL_POLICY"] = str(policy_file)
    try:
        times, behind = measure(policy_file, args.sensor or SENSORS, args.max_evaluations)
    finally:
        if server is not None:
            server.stop()  # type: ignore[attr-defined]
    where = "S3 (moto)" if args.s3 else "local"
    print(f"| sensor ({args.targets} targets, {args.backups} backups each, {where}) | first evaluation | evaluations "
          "to catch up | steady evaluation |")
    print("|---|---:|---:|---:|")
    for name, (first, *rest) in times.items():
        steady = f"{rest[-1]:.2f} s" if rest else "-"
        if name in behind:
            steady = f"not caught up ({steady} the last of {len(rest) + 1})"
        print(f"| {name} | {first:.2f} s | {len(rest) or '-'} | {steady} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
