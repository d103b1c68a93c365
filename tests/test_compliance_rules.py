"""Each control's rule judged on evidence that passes, fails and is missing: evidence tables built here as the
audit trail would give them, judged by the report's own code (derive_tables, figures, controls). No database,
no PDF: fast."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from regal_dagster.engine.audit import ChainVerdict
from regal_dagster.engine.compliance.controls import (
    FAIL,
    NOT_TESTED,
    OUT_OF_SCOPE,
    PASS,
    Control,
    Facts,
    evaluate_controls,
    exceptions,
    framework_verdicts,
)
from regal_dagster.engine.compliance.evidence import (
    COLUMNS,
    Evidence,
    Period,
    derive_tables,
    figures,
    operational_failures,
)
from regal_dagster.engine.compliance.operation import Operation
from regal_dagster.engine.policy import Policy, policy_from_dict

PERIOD = Period.parse("2026-10")
NOW = datetime(2026, 11, 2, tzinfo=UTC)
IN_OPERATION = datetime(2026, 10, 7, 0, 0, tzinfo=UTC)  # the period's first six days predate the system


def _policy(tmp_path: Path, **settings: Any) -> Policy:
    return policy_from_dict({
        "repository": {"url": "repository"},
        "encryption": {"keyset": "keyset.json", "master_key": {"env": "REGAL_TEST_MASTER_KEY"}},
        "targets": {"pos": {"kind": "postgres", "dsn": "postgresql://127.0.0.1/pos"}},
        "schedules": {"daily": {"cron": "0 2 * * *"}},
        "alerts": {"channels": [{"kind": "webhook", "url": "https://hooks.example/x"}]},
        **settings}, base_dir=tmp_path)


def _daily(skip: tuple[int, ...] = (), first: int = 7, last: int = 31) -> list[dict[str, Any]]:
    return [{"seq": day, "at": f"2026-10-{day:02d}T02:05:00+00:00", "outcome": "success", "target": "pos",
             "resource": f"pos:2026-10-{day:02d}", "retention_class": "daily", "event_type": "backup"}
            for day in range(first, last + 1) if day not in skip]


def _judge(policy: Policy, since: datetime | None = IN_OPERATION, checkpoints: int = 1, chain_ok: bool = True,
           **tables: list[dict[str, Any]]) -> tuple[dict[str, Control], Evidence, dict[str, Any]]:
    evidence = Evidence({name: [] for name in COLUMNS})
    evidence.tables.update(tables)
    at = PERIOD.judged_at(NOW)
    derive_tables(policy, evidence, Operation(since, since), PERIOD, at)
    figs = figures(policy, evidence, PERIOD, NOW)
    verdict = ChainVerdict(chain_ok, 40, 40, "ab" * 32, None if chain_ok else 12,
                           None if chain_ok else "was edited", checkpoints=checkpoints)
    matrix = evaluate_controls(Facts(policy, evidence, figs, operational_failures(evidence), verdict, PERIOD, NOW))
    return {c.control_id: c for c in matrix}, evidence, figs


def test_bk01_judges_schedule_adherence_from_when_the_system_went_into_operation(tmp_path: Path) -> None:
    policy = _policy(tmp_path)
    passing, evidence, figs = _judge(policy, backups=_daily())
    assert passing["BK-01"].result == PASS and "24 of 24 scheduled backups ran" in passing["BK-01"].finding
    assert figs["days"] == {"not in operation": 6, "covered": 25, "gap": 0}  # days 1-6: no system, not gaps
    assert figs["in_operation_since"] == IN_OPERATION.isoformat()

    failing, evidence, figs = _judge(policy, backups=_daily(skip=(15,)))  # one tick without its backup
    assert failing["BK-01"].result == FAIL and "missed: pos 1 (first 2026-10-15 02:00)" in failing["BK-01"].finding
    assert figs["days"]["gap"] == 1 and [d["day"] for d in evidence.tables["coverage"] if d["state"] == "gap"] == [
        "2026-10-15"]
    # Twice as many backups on the other days do not make up for a missed tick: adherence, not a count.
    doubled = _daily(skip=(15,)) + [{**r, "at": r["at"].replace("02:05", "03:05")} for r in _daily(skip=(15,))]
    assert _judge(policy, backups=doubled)[0]["BK-01"].result == FAIL

    # One backup seconds after the system went into operation, an hour before the period's end: nothing to judge.
    late = datetime(2026, 10, 31, 23, 0, tzinfo=UTC)
    missing, _, figs = _judge(policy, since=late, backups=[{**_daily()[0], "at": "2026-10-31T23:00:05+00:00"}])
    assert missing["BK-01"].result == NOT_TESTED and "cannot be judged yet" in missing["BK-01"].finding
    assert figs["days"] == {"not in operation": 30, "covered": 1, "gap": 0}


def test_a_period_before_the_policy_existed_is_out_of_scope_not_exceptions(tmp_path: Path) -> None:
    policy = _policy(tmp_path)
    matrix, _, figs = _judge(policy, since=datetime(2026, 11, 1, 12, tzinfo=UTC))
    assert {c.result for c in matrix.values()} == {OUT_OF_SCOPE}
    assert exceptions(policy, list(matrix.values()), PERIOD, NOW) == []
    assert set(framework_verdicts(list(matrix.values())).values()) == {OUT_OF_SCOPE}
    assert figs["days"]["not in operation"] == 31


def test_au02_needs_a_checkpoint_outside_the_database(tmp_path: Path) -> None:
    policy = _policy(tmp_path)
    assert _judge(policy, checkpoints=2)[0]["AU-02"].result == PASS
    assert _judge(policy, chain_ok=False)[0]["AU-02"].result == FAIL
    missing = _judge(policy, checkpoints=0)[0]["AU-02"]
    assert missing.result == NOT_TESTED and "no checkpoint outside the audit database" in missing.finding


@pytest.mark.parametrize(("offsite", "checked", "result", "said"), [
    ({"url": "s3://copies/regal", "endpoint_url": "https://s3.eu-central-1.example"}, [True], PASS,
     "another failure domain"),
    ({"url": "copy"}, [True], FAIL, "NOT off-site: it shares the primary's file system"),  # same file system
    ({"url": "s3://copies/regal", "endpoint_url": "https://s3.example"}, [True, False], FAIL,
     "off-site check failures: 1"),
    ({"url": "s3://copies/regal", "endpoint_url": "https://s3.example"}, [], NOT_TESTED, "copies checked: 0"),
    (None, [], FAIL, "off-site copy NOT configured"),
])
def test_md01_needs_a_copy_in_another_failure_domain(tmp_path: Path, offsite: dict[str, str] | None,
                                                     checked: list[bool], result: str, said: str) -> None:
    policy = _policy(tmp_path, offsite=offsite)
    verifications = [{"seq": i, "at": "2026-10-10T03:00:00+00:00", "outcome": "success", "target": "pos",
                      "resource": f"pos:{i}", "checks": {"offsite_copy": ok}} for i, ok in enumerate(checked)]
    control = _judge(policy, verifications=verifications)[0]["MD-01"]
    assert control.result == result and said in control.finding, control.finding
    assert "immutability: primary none" in control.finding


def test_a_refusal_that_protected_data_is_not_a_failed_operation(tmp_path: Path) -> None:
    policy = _policy(tmp_path)
    refused = {"seq": 50, "at": "2026-10-20T10:00:00+00:00", "outcome": "failure", "target": "pos",
               "resource": "pos:1", "event_type": "restore", "refused": True,
               "error": "the database pos is not empty"}
    matrix, evidence, figs = _judge(policy, backups=_daily(), restores=[refused])
    assert operational_failures(evidence) == [] and figs["refusals"] == 1
    assert evidence.tables["refusals"][0]["what"] == "the database pos is not empty"
    assert matrix["AL-01"].result == PASS and "0 failed operation(s)" in matrix["AL-01"].finding
    # The same event without the refusal mark is a failure nobody was alerted about.
    failed = _judge(policy, backups=_daily(), restores=[{**refused, "refused": False}])[0]
    assert failed["AL-01"].result == FAIL


IDENTIFIERS = {  # each framework's requirements by its own identifiers, as the issue names them
    "soc2": ["A1.2", "A1.3", "CC7.4", "CC7.5"],
    "iso27001": ["8.13", "5.30", "8.15", "8.24"],
    "hipaa": [f"164.308(a)(7)(ii)({x})" for x in "ABCDE"] + ["164.312(b)"],
    "dora": [f"Art. 12({n})" for n in range(1, 8)],
    "nis2": ["4.2.2", "4.2.3", "4.2.6"],
    "nist80053": ["CP-9", "CP-9(1)", "CP-9(2)", "CP-9(3)", "CP-9(5)", "CP-9(8)", "CP-10(2)", "CP-10(4)", "CP-4",
                  "AU-9", "AU-10", "SC-12", "SC-13", "SC-28"],
}


def _matrix(results: dict[str, str]) -> list[Control]:
    from regal_dagster.engine.compliance.controls import CONTROLS

    return [Control(s.control_id, list(s.mapping), s.description, s.frequency, s.test,
                    results.get(s.control_id, PASS), "", s.evidence) for s, _ in CONTROLS]


@pytest.mark.parametrize("key", sorted(IDENTIFIERS))
def test_each_framework_judges_each_requirement_on_passing_failing_and_missing_evidence(key: str) -> None:
    """For every requirement of every new framework: all its controls passing -> PASS; one failing -> FAIL (and
    the framework FAILs); one without evidence -> NOT TESTED (never PASS); no control of ours -> NOT TESTED."""
    from regal_dagster.engine.compliance.controls import requirement_results
    from regal_dagster.engine.compliance.frameworks.registry import frameworks

    framework = frameworks([key])[key]
    assert list(framework.requirements) == IDENTIFIERS[key]
    for requirement, controls in framework.requirements.items():
        if not controls:  # nothing we record evidences it: never PASS, and it says why
            assert requirement_results(_matrix({}), [key])[key][requirement] == NOT_TESTED
            assert framework.untested.get(requirement)
            continue
        for control in controls:
            for given, expected in ((PASS, PASS), (FAIL, FAIL), (NOT_TESTED, NOT_TESTED)):
                matrix = _matrix({c: PASS for c in controls} | {control: given})
                assert requirement_results(matrix, [key])[key][requirement] == expected, (requirement, control)
        failing = framework_verdicts(_matrix({controls[0]: FAIL}), [key])
        assert failing == {framework.name: FAIL}
    passing = framework_verdicts(_matrix({}), [key])[framework.name]
    assert passing == (NOT_TESTED if any(not c for c in framework.requirements.values()) else PASS)


def test_an_unknown_framework_is_refused_naming_the_known_ones(tmp_path: Path, master_key: str) -> None:
    from .conftest import run_cli, write_policy_file

    policy_file = write_policy_file(tmp_path, {"pos": "postgresql://127.0.0.1/pos"}, initialize=False)
    refused = run_cli(policy_file, "report", "--period", "2026-10", "--framework", "soc2", "--framework", "sox2")
    assert refused.returncode == 2, refused.stderr
    said = refused.stdout + refused.stderr
    assert "unknown compliance framework(s): sox2" in said and "Traceback" not in said
    assert "pci, sox, gdpr, soc2, iso27001, hipaa, dora, nis2, nist80053" in said


TIERS = {"tier1": {"backup_every": "1d", "rpo": "1d", "rto": "1h"}, "tier3": {"backup_every": "7d", "rpo": "7d",
                                                                                 "rto": "1d"}}


def _restore_test(rto: float) -> dict[str, Any]:
    return {"seq": 90, "at": "2026-10-20T05:00:00+00:00", "outcome": "success", "target": "pos",
            "resource": "pos:2026-10-20", "event_type": "restore_test", "rto_seconds": rto,
            "rto_target_seconds": 3600}


@pytest.mark.parametrize(("tier", "skip", "tests", "result", "said"), [
    ("tier1", (), [_restore_test(600)], PASS, "not met: none"),
    ("tier1", (15, 16), [_restore_test(600)], FAIL, "backups 3 d apart, the tier asks every 24 h"),
    ("tier1", (), [_restore_test(7200)], FAIL, "restore took 2 h against an RTO of 60 min"),
    ("tier3", (15, 16), [_restore_test(7200)], PASS, "not met: none"),  # a weekly tier asks less
    ("tier1", (), [], NOT_TESTED, "RTO untested): pos"),
    (None, (), [_restore_test(600)], NOT_TESTED, "without a tier: pos"),
])
def test_ti01_each_target_gets_what_its_criticality_tier_implies(
        tmp_path: Path, tier: str | None, skip: tuple[int, ...], tests: list[dict[str, Any]], result: str,
        said: str) -> None:
    policy = _policy(tmp_path, tiers=TIERS, targets={"pos": {"kind": "postgres", "dsn": "postgresql://127.0.0.1/pos",
                                                             "tier": tier}})
    matrix, evidence, _ = _judge(policy, backups=_daily(skip=skip), restore_tests=tests)
    assert matrix["TI-01"].result == result and said in matrix["TI-01"].finding, matrix["TI-01"].finding
    if tier:  # the tier's RPO and RTO are the target's unless it gives its own
        assert policy.rpo_for("pos").total_seconds() == evidence.tables["tiers"][0]["rpo_seconds"]


def test_a_target_naming_an_unknown_tier_is_refused(tmp_path: Path) -> None:
    from regal_dagster.engine.errors import PolicyError

    with pytest.raises(PolicyError, match="'gold' is not one of the policy's tiers"):
        _policy(tmp_path, tiers=TIERS, targets={"pos": {"kind": "postgres", "dsn": "postgresql://h/pos",
                                                        "tier": "gold"}})


def _passed_test(seq: int, day: int, segregation: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"seq": seq, "at": f"2026-10-{day:02d}T05:00:00+00:00", "outcome": "success", "target": "pos",
            "resource": f"pos:{day}", "event_type": "restore_test", "rto_seconds": 60, "rto_target_seconds": 3600,
            **({"segregation": segregation} if segregation else {})}


def _signoff(result_id: int) -> dict[str, Any]:
    return {"seq": 900 + result_id, "at": "2026-11-01T09:00:00+00:00", "actor": "user:cfo", "result_id": result_id,
            "result_type": "restore_test", "by": "A. Auditee", "role": "IT operations manager", "note": ""}


@pytest.mark.parametrize(("tests", "signoffs", "result", "said"), [
    ([_passed_test(1, 10), _passed_test(2, 30)], [_signoff(1), _signoff(2)], PASS, "2 of 2"),
    ([_passed_test(1, 10), _passed_test(2, 30)], [_signoff(2)], FAIL, "deadline: entry 1"),  # 23 days unsigned
    ([_passed_test(2, 30)], [], NOT_TESTED, "awaiting sign-off within it: 1"),  # 3 days: not yet due
    ([{**_passed_test(1, 10), "outcome": "failure"}], [], NOT_TESTED, "no passed restore test"),
])
def test_so01_passed_results_are_signed_off_before_the_deadline(
        tmp_path: Path, tests: list[dict[str, Any]], signoffs: list[dict[str, Any]], result: str, said: str) -> None:
    control = _judge(_policy(tmp_path), restore_tests=tests, signoffs=signoffs)[0]["SO-01"]
    assert control.result == result and said in control.finding, control.finding


ELSEWHERE = {"host_id": "machine-id 1", "host": "restore-1", "os_user": "regal", "network_namespace": "net:[1]",
             "repository_identity": "S3 access key ab12 (digest)", "source": "db-1:5432", "same_host_as_source": False}


@pytest.mark.parametrize(("segregation", "result", "said"), [
    ([ELSEWHERE, ELSEWHERE], PASS, "2 of 2 passed restore test(s) record where they ran"),
    ([ELSEWHERE, {**ELSEWHERE, "same_host_as_source": True}], FAIL, "own host: entry 2"),
    ([ELSEWHERE, None], NOT_TESTED, "1 of 2"),  # a test from before segregation evidence
    ([], NOT_TESTED, "0 of 0"),
])
def test_sg01_restore_tests_show_they_ran_apart_from_the_source(
        tmp_path: Path, segregation: list[dict[str, Any] | None], result: str, said: str) -> None:
    tests = [_passed_test(i + 1, 10 + i, g) for i, g in enumerate(segregation)]
    control = _judge(_policy(tmp_path), restore_tests=tests)[0]["SG-01"]
    assert control.result == result and said in control.finding, control.finding


@pytest.mark.parametrize(("lock", "result"), [("COMPLIANCE", PASS), ("GOVERNANCE", FAIL), (None, FAIL)])
def test_im01_immutability_by_object_lock_mode(tmp_path: Path, lock: str | None, result: str) -> None:
    offsite = {"url": "s3://copies/regal", "endpoint_url": "https://s3.example",
               **({"object_lock": {"mode": lock}} if lock else {})}
    matrix, evidence, _ = _judge(_policy(tmp_path, offsite=offsite))
    assert matrix["IM-01"].result == result, matrix["IM-01"].finding
    assert [r["immutability"] for r in evidence.tables["repositories"]] == ["none", lock or "none"]


def test_the_component_definition_loads_with_trestle_and_names_the_800_53_controls(tmp_path: Path) -> None:
    from trestle.oscal.component import ComponentDefinition

    from regal_dagster.engine.compliance.component import component_definition
    from regal_dagster.engine.compliance.frameworks.registry import frameworks
    from regal_dagster.engine.compliance.oscal import to_bytes

    path = tmp_path / "component-definition.json"
    path.write_bytes(to_bytes(component_definition("0.1.0", NOW)))
    document = ComponentDefinition.oscal_read(path)
    assert document is not None
    (component,) = document.components or []
    implementation, *others = component.control_implementations or []
    assert "NIST_SP-800-53_rev5_catalog.json" in implementation.source
    found = {r.control_id: [p.value for p in r.props or []] for r in implementation.implemented_requirements}
    assert set(found) == {"cp-9", "cp-9.1", "cp-9.2", "cp-9.3", "cp-9.5", "cp-9.8", "cp-10.2", "cp-10.4", "cp-4",
                          "au-9", "au-10", "sc-12", "sc-13", "sc-28"}
    assert found["cp-9.8"] == ["EN-01", "KM-01"] and found["cp-9.3"] == ["MD-01"]
    assert to_bytes(component_definition("0.1.0", NOW)) == path.read_bytes()  # the same version, the same document
    # Every other framework, by identifier only: each requirement as the report cites it, with our controls.
    mapped = {o.source.rsplit(":", 1)[1]: {next(p.value for p in r.props if p.name == "framework-identifier"):
                                           [p.value for p in r.props if p.name == "regal-control"]
                                           for r in o.implemented_requirements} for o in others}
    expected = {key: {f"{f.citation} {i}": list(c) for i, c in f.requirements.items()}
                for key, f in frameworks().items() if key != "nist80053"}
    assert mapped == expected and {"pci", "sox", "gdpr", "soc2", "iso27001", "hipaa", "dora", "nis2"} <= set(mapped)
    assert mapped["hipaa"]["HIPAA 164.308(a)(7)(ii)(A)"] and mapped["soc2"]["SOC 2 A1.2"]
