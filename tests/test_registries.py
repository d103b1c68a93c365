"""What each registry knows (source kinds, storage backends, alert channels, compliance frameworks), and that
a new backend, channel or framework is one new module: dropped beside the others, it is found, accepted by the policy
and used, with no other edit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from regal_dagster.engine.channels.base import ChannelError, ChannelSettings, Notification
from regal_dagster.engine.channels.registry import channel_kinds, channel_models, send
from regal_dagster.engine.compliance.controls import CONTROLS
from regal_dagster.engine.compliance.frameworks.registry import citations_of, frameworks
from regal_dagster.engine.errors import PolicyError
from regal_dagster.engine.policy import policy_from_dict
from regal_dagster.engine.sources.registry import kinds
from regal_dagster.engine.storage.registry import backends

ROOT = Path(__file__).resolve().parents[1]


def _policy(tmp_path: Path, channels: list[dict[str, object]]) -> dict[str, object]:
    return {"repository": {"url": str(tmp_path / "repo")},
            "encryption": {"keyset": "keyset.json", "master_key": {"env": "UNUSED"}},
            "targets": {"etc": {"kind": "files", "paths": [str(tmp_path)]}},
            "alerts": {"channels": channels}}


def test_each_registry_lists_what_it_knows() -> None:
    assert kinds() == ["config", "files", "postgres", "postgres_cluster", "redis", "terraform"]
    assert [b.kind for b in backends()] == ["filesystem", "s3"]
    assert channel_kinds() == ["email", "file", "pagerduty", "sentry", "slack", "webhook"]
    assert [m.__name__ for m in channel_models()] == ["EmailChannel", "FileChannel", "PagerDutyChannel",
                                                      "SentryChannel", "SlackChannel", "WebhookChannel"]
    assert {key: f.name for key, f in frameworks().items()} == {  # in the report's order
        "pci": "PCI DSS 4.0.1", "sox": "SOX ITGC", "gdpr": "GDPR", "soc2": "SOC 2 (TSC 2017, rev. 2022)",
        "iso27001": "ISO/IEC 27001:2022", "hipaa": "HIPAA Security Rule", "dora": "DORA (EU) 2022/2554",
        "nis2": "NIS2 (EU) 2024/2690", "nist80053": "NIST SP 800-53 rev. 5"}
    controls = {spec.control_id for spec, _ in CONTROLS}
    for key, framework in frameworks().items():
        assert framework.controls() <= controls, key  # every requirement maps to controls that exist
    assert all(citations_of(control_id) for control_id in controls)  # every control serves a framework
    assert citations_of("BK-01", ["pci", "sox", "gdpr"]) == ("SOX ITGC CO-1", "PCI DSS 12.10.1")


def test_an_unknown_channel_kind_is_refused_by_the_policy_and_by_the_sender(tmp_path: Path) -> None:
    with pytest.raises(PolicyError) as refused:
        policy_from_dict(_policy(tmp_path, [{"kind": "teams", "webhook_url_env": "TEAMS_URL"}]), base_dir=tmp_path)
    assert refused.value.problems == [
        "alerts.channels.0.kind: use one of 'email', 'file', 'pagerduty', 'sentry', 'slack', 'webhook'"]
    notification = Notification("alert", {"what": "x", "target": "etc", "link": "", "first_step": "",
                                          "event": "capacity", "key": "capacity"}, "now", "now")
    with pytest.raises(ChannelError, match="knows no alert channel kind 'teams'"):
        send(ChannelSettings(kind="teams"), notification, Path)
    with pytest.raises(ChannelError, match="needs its own settings"):
        send(ChannelSettings(kind="file"), notification, Path)


TEAMS = '''
from typing import Literal

from regal_dagster.engine.channels.base import ChannelSettings, Notification


class TeamsChannel(ChannelSettings):
    kind: Literal["teams"]
    path: str


CHANNEL = TeamsChannel


def send(channel, notification: Notification, resolve_path) -> None:
    with open(resolve_path(channel.path), "a") as out:
        out.write("teams: " + notification.subject + "\\n")
'''

ACME = '''
from regal_dagster.engine.compliance.frameworks.base import Framework

FRAMEWORK = Framework(name="ACME Backup Standard", citation="ACME", position=100,
                      requirements={"B.2": ("BK-01", "MD-01"), "B.3": ("RT-01", "DR-01"), "C.7": ("AL-01",)})
'''

PROBE = '''
import json, sys
from datetime import UTC, datetime
from pathlib import Path

import regal_dagster.engine.channels as channels
import regal_dagster.engine.compliance.frameworks as frameworks

plugins = Path(sys.argv[1])
channels.__path__.append(str(plugins / "channels"))
frameworks.__path__.append(str(plugins / "frameworks"))

from regal_dagster.engine.alerts import AlertBook, Condition, evaluate_and_notify
from dataclasses import astuple
from regal_dagster.engine.compliance.controls import CONTROLS, PASS, Control, framework_verdicts
from regal_dagster.engine.compliance.frameworks.registry import citations_of
from regal_dagster.engine.policy import policy_from_dict

policy = policy_from_dict(json.loads(sys.argv[2]), base_dir=plugins)
failures = evaluate_and_notify(policy, AlertBook(), [Condition("capacity", "capacity", "repository", "disk full",
                               "http://x", "prune")], datetime.now(UTC))
matrix = [Control(s.control_id, list(s.mapping), s.description, s.frequency, s.test, PASS, "", s.evidence)
          for s, _ in CONTROLS]
scope = ["pci", "sox", "gdpr", "acme"]
matrix = [Control(c.control_id, list(citations_of(c.control_id, scope)), *astuple(c)[2:]) for c in matrix]
print(json.dumps({"failures": failures, "sent": (plugins / "teams.log").read_text(),
                  "verdicts": framework_verdicts(matrix, scope), "BK-01": matrix[0].mapping,
                  "acme": sorted(c.control_id for c in matrix if "acme" in c.frameworks)}))
'''


def test_a_new_channel_and_a_new_framework_are_each_one_module(tmp_path: Path) -> None:
    """A Teams channel and a made-up framework (ACME), each one module in its package's folder (here, a folder
    added to the package's path in a fresh interpreter): the policy accepts the channel and alerts go out on it; the
    report cites ACME's requirements and gives its verdict."""
    (tmp_path / "channels").mkdir()
    (tmp_path / "channels" / "teams.py").write_text(TEAMS)
    (tmp_path / "frameworks").mkdir()
    (tmp_path / "frameworks" / "acme.py").write_text(ACME)
    policy = _policy(tmp_path, [{"kind": "teams", "path": "teams.log"}])
    probe = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path), json.dumps(policy)], cwd=ROOT,
                           capture_output=True, text=True, timeout=120, check=False)
    assert probe.returncode == 0, probe.stderr
    found = json.loads(probe.stdout)
    assert found["failures"] == [] and found["sent"] == "teams: [Regal Backup] ALERT: disk full\n"
    assert found["verdicts"] == {"PCI DSS 4.0.1": "PASS", "SOX ITGC": "PASS", "GDPR": "PASS",
                                 "ACME Backup Standard": "PASS"}
    assert found["BK-01"] == ["SOX ITGC CO-1", "PCI DSS 12.10.1", "ACME B.2"]
    assert found["acme"] == ["AL-01", "BK-01", "DR-01", "MD-01", "RT-01"]


MIRROR = '''
"""A made-up backend: a directory written through the local store, under its own scheme and settings."""
from __future__ import annotations

from pathlib import Path
from typing import cast

from pydantic import field_validator

from regal_dagster.engine.settings import RepositorySettings
from regal_dagster.engine.storage.base import Backend, Repository
from regal_dagster.engine.storage.local import LocalRepository


class MirrorRepositoryConfig(RepositorySettings):
    copies: int = 1  # a setting only this backend has

    @field_validator("url")
    @classmethod
    def _mirror_url(cls, url: str) -> str:
        if not url.startswith("mirror:///"):
            raise ValueError("a mirror repository is mirror:///absolute/path")
        return url


def _open(config: RepositorySettings, base_dir: Path) -> Repository:
    return LocalRepository(Path(cast(MirrorRepositoryConfig, config).url.removeprefix("mirror://")),
                           lock_wait=config.lock_wait)


BACKEND = Backend(kind="mirror", schemes=("mirror",), example="mirror:///path", repository=LocalRepository,
                  config=MirrorRepositoryConfig, open=_open)
'''

BACKUP_THROUGH_IT = '''
import json, sys
from pathlib import Path

import yaml

import regal_dagster.engine.storage as storage

storage.__path__.append(sys.argv[1])  # the backend's module, as if it were under engine/storage/
from regal_dagster.engine.backup import run_backup
from regal_dagster.engine.bootstrap import init_project
from regal_dagster.engine.checks import run_checks
from regal_dagster.engine.crypto import load_keyring
from regal_dagster.engine.errors import PolicyError
from regal_dagster.engine.policy import load_policy, policy_from_dict
from regal_dagster.engine.repository_format import initialize
from regal_dagster.engine.storage import open_repository
from regal_dagster.engine.storage.registry import backends

base = Path(sys.argv[2])
made = init_project(base / "regal", "postgresql://backup@db.invalid/pos", audit=False)
document = yaml.safe_load(made.policy_path.read_text())
document["repository"] = {"url": f"mirror://{base / 'mirrored'}", "copies": 2}
document["targets"] = {"etc": {"kind": "files", "paths": [str(base / "etc")]}}
(base / "etc").mkdir()
(base / "etc" / "pos.conf").write_text("store = 7")
made.policy_path.write_text(yaml.safe_dump(document))
policy = load_policy(made.policy_path)
repo, keyring = open_repository(policy), load_keyring(policy)
initialize(repo, keyring)
backup = run_backup(policy, "etc", repo=repo, keyring=keyring).manifest
checked = run_checks(policy, repo, keyring, backup.backup_id)
try:
    policy_from_dict({**document, "repository": {"url": f"mirror://{base}", "region": "eu-west-1"}},
                     base_dir=base / "regal")
    refused = ""
except PolicyError as exc:
    refused = str(exc)
print(json.dumps({"backends": [b.kind for b in backends()], "copies": policy.repository.copies,
                  "passed": checked.passed, "stored": sorted(p.name for p in (base / "mirrored").iterdir()),
                  "refused": refused}))
'''


def test_a_new_backend_is_one_module(tmp_path: Path) -> None:
    """A `mirror://` backend with a setting of its own, one module in the storage package's folder (a folder
    added to its path, in a fresh interpreter): the policy takes its settings, a backup is stored through it
    and passes its checks, and a setting of another backend (S3's region) is refused on it."""
    (tmp_path / "backends").mkdir()
    (tmp_path / "backends" / "mirror.py").write_text(MIRROR)
    probe = subprocess.run([sys.executable, "-c", BACKUP_THROUGH_IT, str(tmp_path / "backends"), str(tmp_path)],
                           cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert probe.returncode == 0, probe.stderr[-3000:]
    found = json.loads(probe.stdout.strip().splitlines()[-1])
    assert found["backends"] == ["filesystem", "mirror", "s3"] and found["copies"] == 2
    assert found["passed"] and found["stored"], found  # the repository's files are in the mirror's directory
    assert "region" in found["refused"], found["refused"]
