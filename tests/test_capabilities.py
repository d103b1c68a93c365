"""A new kind with a continuous archive is one folder: a `journal` kind written into a temporary directory (and put
on the kinds' search path, as a folder under engine/sources/ would be) is seen by status, the RPO alerts, prune, the
restore test and Dagster, with no edit anywhere else."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

KIND = '''
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from regal_dagster.engine.catalog import newest_first
from regal_dagster.engine.settings import TargetSettings
from regal_dagster.engine.sources.base import Captured, Source
from regal_dagster.engine.sources.capabilities import (
    ArchiveAsset, ArchiveReach, ArchiveState, ContinuousArchive, TestFindings)


class JournalTarget(TargetSettings):
    kind: Literal["journal"]
    path: str  # the journal file a backup copies
    archive: str  # the directory its shipper stores closed journal files in, as they close


class JournalArchive(ContinuousArchive):
    noun = "journal"

    def state(self, policy: Any, repo: Any, keyring: Any, target: str, now: datetime) -> ArchiveState:
        files = sorted(Path(policy.target(target).archive).iterdir(), key=lambda f: f.stat().st_mtime)
        if not files:
            return ArchiveState(None, None, None)
        newest = files[-1]
        return ArchiveState(newest.name, datetime.fromtimestamp(newest.stat().st_mtime, UTC), None, [],
                            {"newest": newest.name}, {"newest": newest.name, "files": len(files)})

    def covers(self, policy: Any, repo: Any, keyring: Any, manifest: Any) -> bool:
        return True  # a backup copies the whole journal: it needs no closed file to reach its end

    def reach(self, manifest: Any, state: ArchiveState, broken: str | None) -> ArchiveReach:
        return ArchiveReach(True, state.newest_position, f"recoverable to {state.newest_position}")

    def first_steps(self, target: str, state: ArchiveState) -> str:
        return f"restart the journal shipper of {target}"

    def prune(self, policy: Any, repo: Any, keyring: Any, target: str, kept: set[str], *, dry_run: bool) -> int | None:
        oldest = [m for m in newest_first(repo, keyring, target) if m.backup_id in kept]
        if not oldest:
            return None
        directory = Path(policy.target(target).archive)
        doomed = [f for f in directory.iterdir() if f.stat().st_mtime < oldest[-1].started_at.timestamp()]
        if not dry_run:
            for f in doomed:
                f.unlink()
        return len(doomed)

    def test_recoveries(self, policy: Any, repo: Any, keyring: Any, manifest: Any, **_: Any) -> TestFindings:
        return TestFindings(seconds={"rto": 0.5}, details={"recoveries": [{"point": "newest", "problems": []}]},
                            tables=[])

    def asset(self, target: str) -> ArchiveAsset:
        return ArchiveAsset(("journal", target, "archive"), "journal", frozenset({"journal"}),
                            f"the closed journal files of {target}; freshness: the RPO ({{rpo}})", "journal_watch",
                            "each minute: the newest closed journal file of every journal target")


class JournalSource(Source):
    kind = "journal"
    label = "journal"
    restore_test_proves = "recoveries through the journal"

    def capture(self, target: Any, store: Any) -> Captured:
        data = Path(target.path).read_bytes()
        return Captured([store("journal", "journal file", [data], 0)], {"bytes": len(data)})

    def check_structure(self, backup: Any) -> str:
        return "a journal file"

    def restore(self, backup: Any, request: Any) -> Any:
        raise NotImplementedError

    @contextlib.contextmanager
    def scratch_destination(self, work_dir: Path | None, manifest: Any = None) -> Iterator[str]:
        yield str(work_dir)

    def continuous_archive(self) -> ContinuousArchive:
        return JournalArchive()


TARGET = JournalTarget


def load() -> Source:
    return JournalSource()
'''

SCRIPT = '''
import json, os, sys, time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import regal_dagster.engine.sources as sources

sources.__path__.append(sys.argv[1])  # the kind's folder, as if it were under engine/sources/
import yaml

from regal_dagster.engine.alerts import rpo_conditions
from regal_dagster.engine.backup import run_backup
from regal_dagster.engine.bootstrap import init_project
from regal_dagster.engine.checks import run_checks
from regal_dagster.engine.crypto import load_keyring
from regal_dagster.engine.policy import load_policy
from regal_dagster.engine.restore_test import run_restore_test
from regal_dagster.engine.retention import run_prune
from regal_dagster.engine.status import repository_status
from regal_dagster.engine.storage import open_repository

base = Path(sys.argv[2])
made = init_project(base / "regal", "postgresql://backup@db.invalid/pos", audit=False)
(base / "journal").write_text("line 1\\n")
archive = base / "regal" / "journal-archive"
archive.mkdir()
now = time.time()
for name, hours in (("old-1", 50), ("old-2", 49), ("newest", 2)):
    (archive / name).write_text(name)
    os.utime(archive / name, (now - hours * 3600, now - hours * 3600))
document = yaml.safe_load(made.policy_path.read_text())
document["targets"] = {"ledger": {"kind": "journal", "path": str(base / "journal"), "archive": str(archive)}}
made.policy_path.write_text(yaml.safe_dump(document))
policy = load_policy(made.policy_path)
repo, keyring = open_repository(policy), load_keyring(policy)
backup = run_backup(policy, "ledger", repo=repo, keyring=keyring).manifest
assert run_checks(policy, repo, keyring, backup.backup_id).passed
at = datetime.now(UTC)
shown = repository_status(policy, repo, keyring, at).targets[0]
conditions = rpo_conditions(policy, repo, keyring, at)
pruned = run_prune(policy, repo, at, dry_run=True, keyring=keyring)
tested = run_restore_test(policy, repo, keyring, backup, work_dir=base)

import dagster as dg

from regal_dagster.defs import build_definitions

defs = build_definitions(str(made.policy_path))
key = dg.AssetKey(["journal", "ledger", "archive"])
spec = defs.resolve_assets_def(key).get_asset_spec(key)
instance = dg.DagsterInstance.ephemeral()
context = dg.build_sensor_context(instance=instance, definitions=defs, resources=defs.resources)
events = defs.resolve_sensor_def("journal_watch")(context).asset_events
print(json.dumps({
    "rpo_age": shown.rpo_age_seconds,
    "conditions": [[c.key, c.what, c.link, c.first_step] for c in conditions],
    "wal_deleted": pruned.wal_deleted,
    "restore_test": [tested.validation_passed, tested.rto_seconds, tested.details],
    "asset": [spec.group_name, spec.description, [d.asset_key.path for d in spec.deps]],
    "events": [[e.asset_key.path, e.metadata["files"].value] for e in events],
}))
'''


def test_a_new_kind_with_a_continuous_archive_is_one_folder(tmp_path: Path) -> None:
    folder = tmp_path / "kinds"
    (folder / "journal").mkdir(parents=True)
    (folder / "journal" / "__init__.py").write_text(textwrap.dedent(KIND))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent.parent),
                                                        os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(folder), str(tmp_path)], capture_output=True, text=True,
                          env=env, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert 2 * 3600 - 60 < found["rpo_age"] < 2 * 3600 + 600  # the newest archived file's age, not the backup's
    [[key, what, link, first_step]] = found["conditions"]
    assert key == "rpo:ledger" and "the newest stored journal is" in what and "cannot be asked" in what
    assert link.endswith("/assets/journal/ledger/archive") and first_step == "restart the journal shipper of ledger"
    assert found["wal_deleted"] == {"ledger": 3}  # all three were closed before the kept backup started
    passed, rto, details = found["restore_test"]
    assert passed and rto == 0.5 and details["recoveries"] == [{"point": "newest", "problems": []}]
    group, description, deps = found["asset"]
    assert group == "journal_default" and description.endswith("freshness: the RPO (1 h)")
    assert deps == [["journal", "ledger", "backup"]]
    assert found["events"] == [[["journal", "ledger", "archive"], 3]]
