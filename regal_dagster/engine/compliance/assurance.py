"""The controls on what people attest and where things run: each target's criticality tier met (TI-01),
restore tests and drills signed off by management in time (SO-01), restore tests run on systems segregated
from the source (SG-01) and backups kept immutable (IM-01)."""

from __future__ import annotations

from datetime import datetime

from .charts import human_seconds
from .facts import Facts, Judgement, few


def tiers_met(f: Facts) -> Judgement:
    rows = f.t["tiers"]
    untiered = [r["target"] for r in rows if not r["tier"]]
    problems, untested = [], []
    for r in rows:
        if not r["tier"]:
            continue
        name, tier = r["target"], r["tier"]
        if r["rpo_achieved_seconds"] is None:
            problems.append(f"{name} ({tier}): no successful backup")
            continue
        if r["longest_interval_seconds"] is not None and r["longest_interval_seconds"] > r["backup_every_seconds"]:
            problems.append(f"{name} ({tier}): backups {human_seconds(r['longest_interval_seconds'])} apart, "
                            f"the tier asks every {human_seconds(r['backup_every_seconds'])}")
        if r["rpo_achieved_seconds"] > r["rpo_seconds"]:
            problems.append(f"{name} ({tier}): RPO achieved {human_seconds(r['rpo_achieved_seconds'])} against "
                            f"{human_seconds(r['rpo_seconds'])}")
        if r["worst_rto_seconds"] is None:
            untested.append(name)
        elif r["worst_rto_seconds"] > r["rto_seconds"]:
            problems.append(f"{name} ({tier}): restore took {human_seconds(r['worst_rto_seconds'])} against an RTO "
                            f"of {human_seconds(r['rto_seconds'])}")
    finding = (f"{len(rows) - len(untiered)} of {len(rows)} target(s) have a tier; "
               f"not met: {few(problems, 'tiers.csv', '; ')}; without a "
               f"tier: {few(untiered, 'tiers.csv')}; tiered targets without a restore test in the period (RTO "
               f"untested): {few(untested, 'tiers.csv')}")
    if problems:
        return Judgement(False, finding)
    return Judgement(None if untiered or untested else True, finding)


def signed_off(f: Facts) -> Judgement:
    results = [r for r in f.t["restore_tests"] + f.t["drills"] if r["outcome"] == "success"]
    if not results:
        return Judgement(None, "no passed restore test or drill in the period to sign off")
    signed = {int(s["result_id"]) for s in f.t["signoffs"]}
    deadline = f.policy.reports.signoff_within
    unsigned = [r for r in results if r["seq"] not in signed]
    overdue = [r for r in unsigned if f.now - datetime.fromisoformat(r["at"]) > deadline]
    late = few([f"entry {r['seq']}" for r in overdue], "restore_tests.csv, drills.csv, signoffs.csv")
    finding = (f"{len(results) - len(unsigned)} of {len(results)} passed restore test(s) and drill(s) signed off; "
               f"unsigned past the {human_seconds(deadline.total_seconds())} deadline: {late}; awaiting sign-off "
               f"within it: {len(unsigned) - len(overdue)}")
    if overdue:
        return Judgement(False, finding)
    return Judgement(None if unsigned else True, finding)


def segregated(f: Facts) -> Judgement:
    tests = [r for r in f.t["restore_tests"] if r["outcome"] == "success"]
    recorded = [r for r in tests if r.get("segregation")]
    same = [r for r in recorded if r["segregation"].get("same_host_as_source")]
    on_source = few([f"entry {r['seq']}" for r in same], "restore_tests.csv")
    finding = (f"{len(recorded)} of {len(tests)} passed restore test(s) record where they ran; on the source's "
               f"own host: {on_source}")
    if same:
        return Judgement(False, finding)
    return Judgement(None if not tests or len(recorded) < len(tests) else True, finding)


def immutable(f: Facts) -> Judgement:
    modes = {r["role"]: r["immutability"] for r in f.t["repositories"]}
    said = ", ".join(f"{role} {mode}" for role, mode in modes.items())
    if "COMPLIANCE" in modes.values():
        return Judgement(True, f"objects locked in COMPLIANCE mode (nobody can delete them early): {said}")
    if "GOVERNANCE" in modes.values():
        return Judgement(False, f"GOVERNANCE mode only: identities allowed to bypass it can delete backups: {said}")
    return Judgement(False, f"no repository locks its objects: {said}")
