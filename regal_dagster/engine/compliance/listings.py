"""What the PDF lists row by row. A per-row table of up to `WHOLE` rows is printed whole; a longer one lists only
the rows that need attention (a failure, a gap, a test not signed off or not segregated, a target short of its
tier), with the counts and the attached CSV that holds every row. A fleet's report stays a few dozen pages, and
every row is still in the evidence (its SHA-256 on the cover)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

WHOLE = 25  # a table of up to this many rows is printed whole
MOST = 50  # of a longer one, at most this many rows needing attention are printed (the first, in its order)
ROUTINE = ("backup", "verification")


@dataclass(frozen=True)
class Listing:
    rows: list[Any]  # the rows printed
    total: int  # the rows of the table
    attention: int  # of them, those that need attention
    whole: bool  # every row is printed
    csv: str  # the attachment holding every row

    @property
    def note(self) -> str:
        """The sentence under a table that is not printed whole."""
        if self.whole:
            return ""
        listed = ("listed above" if self.attention <= MOST else f"the first {MOST} listed above") \
            if self.attention else "none listed"
        return f"{self.total} rows, {self.attention} of them needing attention ({listed}); every row is in the " \
               f"attached {self.csv}."


def listing(rows: list[Any], needs_attention: Callable[[Any], bool], csv: str) -> Listing:
    flagged = [r for r in rows if needs_attention(r)]
    whole = len(rows) <= WHOLE
    return Listing(rows if whole else flagged[:MOST], len(rows), len(flagged), whole, csv)


def runs_by_class(targets: list[str], backups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per target and retention class: runs, succeeded, failed (a target without any backup: one row, class
    None and `none` True)."""
    counts: dict[tuple[str, str | None], list[int]] = {}
    for r in backups:
        c = counts.setdefault((r["target"], r.get("retention_class")), [0, 0])
        c[0 if r["outcome"] == "success" else 1] += 1
    order = ["hourly", "daily", "weekly", "monthly", None]
    rows = []
    for target in targets:
        mine = [(cls, counts[(target, cls)]) for cls in order if (target, cls) in counts]
        if not mine:
            rows.append({"target": target, "retention_class": None, "runs": 0, "succeeded": 0, "failed": 0,
                         "none": True})
        for cls, (ok, failed) in mine:
            rows.append({"target": target, "retention_class": cls, "runs": ok + failed, "succeeded": ok,
                         "failed": failed, "none": False})
    return rows


def _tier_short(r: dict[str, Any]) -> bool:
    return bool((r["tier"] and r["longest_interval_seconds"] is not None
                 and r["longest_interval_seconds"] > r["backup_every_seconds"])
                or r["rpo_achieved_seconds"] is None or r["rpo_achieved_seconds"] > r["rpo_seconds"]
                or (r["worst_rto_seconds"] is not None and r["worst_rto_seconds"] > r["rto_seconds"]))


def _test_attention(r: dict[str, Any]) -> bool:
    return r["outcome"] != "success" or (r.get("rto_seconds") is not None and r.get("rto_target_seconds") is not None
                                         and r["rto_seconds"] > r["rto_target_seconds"])


def _not_segregated(r: dict[str, Any]) -> bool:
    g = r.get("segregation") or {}
    return not g or bool(g.get("same_host_as_source"))


def listings(tables: dict[str, list[dict[str, Any]]], targets: list[str]) -> dict[str, Listing]:
    """Each per-row table of the PDF, as it is printed."""
    signed = {int(s["result_id"]) for s in tables["signoffs"]}
    to_sign = sorted((r for r in tables["restore_tests"] + tables["drills"] if r["outcome"] == "success"),
                     key=lambda r: r["seq"])
    by_target: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for r in tables["retention_at_end"]:
        by_target.setdefault(r["target"], {"keep": [], "drop": []})["keep" if r["keep"] else "drop"].append(r)
    retention = []
    for target in targets:
        mine = by_target.get(target, {"keep": [], "drop": []})
        due = sorted(r["delete_after"] for r in mine["keep"] if r["delete_after"])
        retention.append({"target": target, "kept": len(mine["keep"]), "deleted": len(mine["drop"]),
                          "next_deletion": due[0] if due else None})
    return {
        "tiers": listing(tables["tiers"], _tier_short, "tiers.csv"),
        "schedule_adherence": listing(tables["schedule_adherence"], lambda r: r["missed"] > 0,
                                      "schedule_adherence.csv"),
        "runs_by_class": listing(runs_by_class(targets, tables["backups"]), lambda r: r["none"] or r["failed"] > 0,
                                 "backups.csv"),
        "recoverability": listing(tables["recoverability"],
                                  lambda r: not r["point_backup"] or r["rpo_breached"] or bool(r["unrecoverable"]),
                                  "recoverability.csv"),
        "restore_tests": listing(tables["restore_tests"], _test_attention, "restore_tests.csv"),
        "segregation": listing(tables["restore_tests"], _not_segregated, "restore_tests.csv"),
        "signoffs": listing(to_sign, lambda r: r["seq"] not in signed, "signoffs.csv (and restore_tests.csv)"),
        "transport": listing(tables["transport"], lambda r: r["protection"] not in ("TLS", "local"), "transport.csv"),
        "retention": listing(retention, lambda r: r["kept"] == 0, "retention_at_end.csv"),
        "audit_events": listing(
            [e for e in tables["audit_events"] if not (e["outcome"] == "success" and e["event_type"] in ROUTINE)],
            lambda e: e["outcome"] != "success", "audit_events.csv"),
    }
