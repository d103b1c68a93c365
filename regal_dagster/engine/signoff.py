"""Management sign-off of restore tests and drills: `regal-backup signoff RESULT_ID --by NAME --role ROLE`,
one audited `signoff` event naming the result (its audit entry), who signed, in what role, and a note.

Only a result that exists and passed can be signed off: an unknown entry, an entry that is not a restore test
or drill, or a failed one is refused (exit 2), and the refusal is audited too. The report's SO-01 fails when a
passed result of the period is still unsigned `reports.signoff_within` after it ran."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from .audit import AuditTrail, record
from .errors import UsageError
from .policy import Policy
from .storage import Repository

SIGNABLE = {"restore_test": "restore test", "dr_drill": "drill"}


@dataclass(frozen=True)
class SignOff:
    result_id: int  # the audit entry of the restore test or drill
    result_type: str
    result_resource: str
    result_at: str
    by: str
    role: str
    note: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def sign_off(policy: Policy, repo: Repository, result_id: str, by: str, role: str, note: str = "",
             trigger: dict[str, str] | None = None) -> SignOff:
    details: dict[str, Any] = {"result_id": result_id, "by": by, "role": role, "note": note}

    def refuse(message: str, hint: str) -> UsageError:
        record(policy, repo, "signoff", f"entry {result_id}", "failure",
               {**details, "refused": True, "error": message}, trigger)
        return UsageError(message, hint)

    if not by.strip() or not role.strip():
        raise refuse("a sign-off needs the signer's name (--by) and role (--role)", "give both")
    if not result_id.isdigit():
        raise refuse(f"'{result_id}' is not a result id", "give the audit entry number of a restore test or "
                     "drill (the report's 'Entry' column, or `regal-backup status`)")
    trail = AuditTrail(policy, repo)
    trail.ensure_schema()
    event = trail.event(int(result_id))
    if event is None or event.event_type not in SIGNABLE:
        what = "no entry" if event is None else f"a {event.event_type.replace('_', ' ')} event"
        raise refuse(f"entry {result_id} is {what}, not a restore test or drill result",
                     "give the entry number of a restore test or drill (the report's 'Entry' column)")
    if event.outcome != "success":
        raise refuse(f"entry {result_id} is a FAILED {SIGNABLE[event.event_type]}: a failed result is not signed "
                     "off", "fix what it found, run it again, and sign off the run that passes")
    signed = SignOff(event.seq, event.event_type, event.resource, event.at.isoformat(), by.strip(), role.strip(),
                     note)
    record(policy, repo, "signoff", f"entry {event.seq}", "success", signed.to_json(), trigger)
    return signed
