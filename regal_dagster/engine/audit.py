"""The audit trail: one event per operation, hash-chained, append-only in PostgreSQL (PCI DSS 10.2, 10.3).

Every backup, verification, restore test, restore, deletion, key operation, policy change, report and
alert is one row of `regal_audit.events` with the fields PCI DSS 10.2.2 asks for: who (`actor`, a user
or service identity), what (`event_type`), when (`at`, UTC), success or failure (`outcome`), where from
(`host`, `process`, Dagster `run_id`) and the affected `resource`; `details` is canonical JSON.

Tamper evidence: each row carries `hash` = SHA-256 of the previous row's hash and the row's canonical
encoding (`prev_hash` repeats the previous hash). The database refuses UPDATE, DELETE and TRUNCATE on the
table (triggers); a superuser can get around that, and `verify` then names the first entry that was
edited, deleted, inserted or reordered. The chain head is checkpointed into the repository (under Object
Lock where enabled), so even rewriting the whole chain consistently is caught; the newest checkpoint is
anchored in the keyset (authenticated with the master key), so deleting or rolling back the checkpoint files
as well is caught too (an older anchor, another machine's older copy of the keyset, is no alarm).

When the audit database cannot be reached, events wait in the repository (`audit/spool/`) and go in, in
order, with the next event that can be written: an operation is never lost, nor blocked, for its audit.
Each event has a unique `event_id`: a spool file put back after it was consumed is not chained twice.
"""

from __future__ import annotations

import contextlib
import functools
import getpass
import hashlib
import json
import os
import platform
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from .audit_db import _connect, _reader
from .documents import read_document, unseal, write_document
from .errors import IntegrityError, RegalError, UsageError
from .layout import AUDIT_CHECKPOINTS, AUDIT_SPOOL, REPOSITORY_MARKER, audit_checkpoint_key, audit_spool_key
from .policy import Policy
from .repository_format import REPOSITORY_KIND, update_keyset
from .storage import Repository
from .storage.base import ObjectMissingError

if TYPE_CHECKING:
    from .crypto import Keyring

GENESIS = "0" * 64
# What this process already did, so an event costs one connection and no repository listing:
_SCHEMA_READY: set[str] = set()  # audit databases set up
_SPOOL_CHECKED: set[str] = set()  # repositories whose spool was empty or flushed (until this process spools)
_POLICY_NOTED: set[tuple[str, str]] = set()  # (audit database, policy hash) known to be recorded
FIELDS = ("seq", "at", "actor", "event_type", "outcome", "host", "process", "run_id", "resource", "details")

DDL = """
CREATE SCHEMA IF NOT EXISTS regal_audit;
CREATE TABLE IF NOT EXISTS regal_audit.events (
    seq        bigint PRIMARY KEY,
    at         timestamptz NOT NULL,
    actor      text NOT NULL,
    event_type text NOT NULL,
    outcome    text NOT NULL CHECK (outcome IN ('success', 'failure')),
    host       text NOT NULL,
    process    text NOT NULL,
    run_id     text,
    resource   text NOT NULL,
    details    text NOT NULL,
    prev_hash  text NOT NULL,
    hash       text NOT NULL
);
ALTER TABLE regal_audit.events ADD COLUMN IF NOT EXISTS event_id text;
CREATE UNIQUE INDEX IF NOT EXISTS events_event_id ON regal_audit.events (event_id);
CREATE INDEX IF NOT EXISTS events_at ON regal_audit.events (at);
-- a target's events (its backups' ids start with its name): the record sequence and the legal holds per target
CREATE INDEX IF NOT EXISTS events_target ON regal_audit.events (split_part(resource, '-', 1), event_type);
CREATE INDEX IF NOT EXISTS events_policy_changes ON regal_audit.events (seq) WHERE event_type = 'policy_change';
CREATE OR REPLACE FUNCTION regal_audit.refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the audit trail is append-only: % on regal_audit.events is refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END $$;
CREATE OR REPLACE TRIGGER events_no_update_delete BEFORE UPDATE OR DELETE ON regal_audit.events
    FOR EACH ROW EXECUTE FUNCTION regal_audit.refuse_change();
CREATE OR REPLACE TRIGGER events_no_truncate BEFORE TRUNCATE ON regal_audit.events
    FOR EACH STATEMENT EXECUTE FUNCTION regal_audit.refuse_change();
"""


@dataclass(frozen=True)
class AuditEvent:
    seq: int
    at: datetime
    actor: str
    event_type: str
    outcome: str
    host: str
    process: str
    run_id: str | None
    resource: str
    details: str  # canonical JSON
    prev_hash: str = ""
    hash: str = ""
    event_id: str | None = None  # unique; None in entries written before events had one

    def canonical(self) -> bytes:
        body = {name: getattr(self, name) for name in FIELDS}
        body["at"] = self.at.astimezone(UTC).isoformat(timespec="microseconds")
        if self.event_id is not None:
            body["event_id"] = self.event_id
        return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()

    def chained_hash(self, prev_hash: str) -> str:
        return hashlib.sha256(prev_hash.encode() + b"\n" + self.canonical()).hexdigest()

    def to_json(self) -> dict[str, Any]:
        return {**{name: getattr(self, name) for name in FIELDS}, "at": self.at.isoformat(),
                "details": json.loads(self.details), "prev_hash": self.prev_hash, "hash": self.hash,
                "event_id": self.event_id}


def canonical_details(details: dict[str, Any]) -> str:
    return json.dumps(details, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def actor(trigger: dict[str, str] | None) -> str:
    """Who: the person behind a CLI command (through sudo too), or the Dagster service for runs."""
    if trigger and trigger.get("dagster_run_id"):
        return f"service:dagster ({getpass.getuser()})"
    return f"user:{os.environ.get('SUDO_USER') or getpass.getuser()}"


def _new_event(event_type: str, resource: str, outcome: str, details: dict[str, Any],
               trigger: dict[str, str] | None = None, at: datetime | None = None) -> AuditEvent:
    """An event from this process, not yet numbered or chained."""
    return AuditEvent(0, at or datetime.now(UTC), actor(trigger), event_type, outcome, platform.node(),
                      f"{os.path.basename(sys.argv[0]) or 'python'}[{os.getpid()}]",
                      (trigger or {}).get("dagster_run_id"), resource, canonical_details(details),
                      event_id=uuid.uuid4().hex)


def _from_spool(body: dict[str, Any]) -> AuditEvent:
    return AuditEvent(0, datetime.fromisoformat(body["at"]), body["actor"], body["event_type"], body["outcome"],
                      body["host"], body["process"], body["run_id"], body["resource"],
                      canonical_details({**body["details"], "spooled": True}), event_id=body.get("event_id"))


SPOOL_KIND, CHECKPOINT_KIND = "audit-spool", "audit-checkpoint"


class AuditTrail:
    def __init__(self, policy: Policy, repo: Repository, keyring: Keyring | None = None):
        if policy.audit is None:
            raise UsageError("the policy has no audit trail", "add audit.dsn (a PostgreSQL database) to the policy")
        self.policy, self.repo, self._keyring = policy, repo, keyring
        self.dsn = policy.audit.resolved_dsn()

    @property
    def keyring(self) -> Keyring:
        """The keys that seal what the trail keeps in the repository (spooled events, checkpoints)."""
        if self._keyring is None:
            from .crypto import load_keyring

            self._keyring = load_keyring(self.policy)
        return self._keyring

    @functools.cached_property
    def repository_id(self) -> str:
        """Which repository this is (its sealed marker's id; its location for a marker from before ids): the
        keyset keeps an audit anchor per repository."""
        marker = read_document(self.repo, self.keyring, REPOSITORY_KIND, REPOSITORY_MARKER)
        return str(marker.get("repository_id") or self.repo.location)

    def ensure_schema(self) -> None:
        with _connect(self.dsn) as conn:
            self._ensure_schema(conn)

    def _ensure_schema(self, conn) -> None:
        if self.dsn not in _SCHEMA_READY:
            conn.execute("SELECT pg_advisory_xact_lock(hashtext('regal_audit.schema'))")
            conn.execute(DDL)
            _SCHEMA_READY.add(self.dsn)

    def append(self, event_type: str, resource: str, outcome: str, details: dict[str, Any],
               trigger: dict[str, str] | None = None, at: datetime | None = None) -> AuditEvent:
        """Write one event at the head of the chain, in one transaction on one connection: first what waits
        in the spool (once per process, or after this process spooled), then the event, then a
        `policy_change` event when the policy file differs from the last one recorded."""
        import psycopg

        pending = _new_event(event_type, resource, outcome, details, trigger, at)
        spooled = [] if self.repo.location in _SPOOL_CHECKED else sorted(s.key for s in self.repo.list(AUDIT_SPOOL))
        try:
            with _connect(self.dsn) as conn:
                self._ensure_schema(conn)
                conn.execute("SELECT pg_advisory_xact_lock(hashtext('regal_audit.events'))")
                for key in spooled:
                    if (event := self._spooled_event(conn, key)) is not None:
                        self._insert(conn, event)
                written = self._insert(conn, pending)
                self._note_policy_change(conn)
            # committed: only now is it true that the spool is in the chain and the policy recorded
        except (RegalError, psycopg.Error) as exc:
            self._spool(pending)
            if isinstance(exc, RegalError):
                raise
            raise RegalError(f"the audit database refused the event: {type(exc).__name__}",
                             "check the audit database (schema regal_audit); the event waits in the "
                             "repository's spool") from None
        for key in spooled:  # a crash before this line repeats them, never loses them
            self.repo.delete(key)
        _SPOOL_CHECKED.add(self.repo.location)
        _POLICY_NOTED.add((self.dsn, self.policy.source_sha256))
        return written

    @staticmethod
    def _insert(conn, event: AuditEvent) -> AuditEvent:
        """Number and chain an event after the head (the caller holds the advisory lock)."""
        head = conn.execute("SELECT seq, hash FROM regal_audit.events ORDER BY seq DESC LIMIT 1").fetchone()
        seq, prev = (head[0] + 1, head[1]) if head else (1, GENESIS)
        numbered = replace(event, seq=seq)
        written = replace(numbered, prev_hash=prev, hash=numbered.chained_hash(prev))
        conn.execute(f"INSERT INTO regal_audit.events ({', '.join(FIELDS)}, prev_hash, hash, event_id) VALUES "
                     f"({', '.join(['%s'] * (len(FIELDS) + 3))})",
                     [getattr(written, n) for n in FIELDS] + [written.prev_hash, written.hash, written.event_id])
        return written

    def _spool(self, event: AuditEvent) -> None:
        _SPOOL_CHECKED.discard(self.repo.location)
        with contextlib.suppress(Exception):  # the repository down as well: nothing more can be done here
            key = audit_spool_key(event.at, uuid.uuid4().hex[:8])
            write_document(self.repo, self.keyring, SPOOL_KIND, key, event.to_json())

    def _spooled_event(self, conn, key: str) -> AuditEvent | None:
        """A spooled event, once its seal holds and it is not in the chain already; a file planted in the spool
        joins the chain only as the record of its refusal (its name, size and SHA-256), never as the event it
        pretends to be, and so does a genuine spool file put back after it was consumed (a replay). None: the
        file is gone (another process flushed the spool since it was listed)."""
        try:
            data = self.repo.get_bytes(key)
        except ObjectMissingError:
            return None
        facts = {"file": key, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        try:
            event = _from_spool(unseal(self.keyring, SPOOL_KIND, key, data))
        except (IntegrityError, KeyError, TypeError, ValueError) as exc:
            reason = exc.message if isinstance(exc, IntegrityError) else "not an audit event"
            return _new_event("audit_spool_refused", key, "failure", {**facts, "reason": reason})
        if (chained := _chained_as(conn, event)) is not None:
            return _new_event("audit_spool_replayed", key, "failure", {
                **facts, "event_id": event.event_id, "chained_as": chained,
                "reason": f"this spooled event is already entry {chained} of the trail: not chained again (a copy "
                          "of a consumed spool file put back, or one a run interrupted before removing it)"})
        return event

    def _note_policy_change(self, conn) -> None:
        digest = self.policy.source_sha256
        if not digest or (self.dsn, digest) in _POLICY_NOTED:
            return
        last = conn.execute("SELECT details FROM regal_audit.events WHERE event_type = 'policy_change' "
                            "ORDER BY seq DESC LIMIT 1").fetchone()
        previous = json.loads(last[0]).get("policy_sha256") if last else None
        if previous != digest:
            self._insert(conn, _new_event("policy_change", "policy", "success",
                                          {"policy_sha256": digest, "previous_sha256": previous}))

    # --- reading ------------------------------------------------------------------------------------

    def events(self, since: datetime | None = None, until: datetime | None = None) -> list[AuditEvent]:
        query = f"SELECT {', '.join(FIELDS)}, prev_hash, hash, event_id FROM regal_audit.events"
        where, params = [], []
        if since is not None:
            where.append("at >= %s")
            params.append(since)
        if until is not None:
            where.append("at < %s")
            params.append(until)
        query += (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY seq"
        with _connect(self.dsn) as conn:
            self._ensure_schema(conn)  # a trail from before event ids gets its column
            return [AuditEvent(*row) for row in conn.execute(query, params)]

    def events_from(self, seq: int) -> list[AuditEvent]:
        """The entries numbered `seq` and after, in order."""
        query = (f"SELECT {', '.join(FIELDS)}, prev_hash, hash, event_id FROM regal_audit.events WHERE seq >= %s "
                 "ORDER BY seq")
        with _connect(self.dsn) as conn:
            self._ensure_schema(conn)
            return [AuditEvent(*row) for row in conn.execute(query, (seq,))]

    def hashes_of(self, seqs: set[int]) -> tuple[dict[int, str], datetime | None]:
        """The stored hash of each of these entries that exists, and the time of the first entry of all."""
        with _connect(self.dsn) as conn:
            self._ensure_schema(conn)
            rows = conn.execute("SELECT seq, hash FROM regal_audit.events WHERE seq = ANY(%s)", (sorted(seqs),))
            hashes = {int(seq): str(digest) for seq, digest in rows}
            first = conn.execute("SELECT at FROM regal_audit.events ORDER BY seq LIMIT 1").fetchone()
        return hashes, first[0] if first else None

    def links_up_to(self, seq: int) -> list[tuple[int, str, int | None, str | None]]:
        """The entries up to `seq` whose place in the chain is wrong, at most one: (its seq, its prev_hash, the
        seq and hash of the entry stored before it). Computed in the database, without the entries' content."""
        query = ("SELECT seq, prev_hash, before_seq, before_hash FROM (SELECT seq, prev_hash, "
                 "lag(seq) OVER (ORDER BY seq) AS before_seq, lag(hash) OVER (ORDER BY seq) AS before_hash "
                 "FROM regal_audit.events WHERE seq <= %s) AS links WHERE seq <> coalesce(before_seq, 0) + 1 "
                 "OR prev_hash <> coalesce(before_hash, %s) ORDER BY seq LIMIT 1")
        with _connect(self.dsn) as conn:
            self._ensure_schema(conn)
            return [(int(a), str(b), c, d) for a, b, c, d in conn.execute(query, (seq, GENESIS))]

    def event(self, seq: int) -> AuditEvent | None:
        """The entry numbered `seq` (None: there is none)."""
        query = f"SELECT {', '.join(FIELDS)}, prev_hash, hash, event_id FROM regal_audit.events WHERE seq = %s"
        with _connect(self.dsn) as conn:
            self._ensure_schema(conn)
            row = conn.execute(query, (seq,)).fetchone()
        return AuditEvent(*row) if row else None

    def details_of(self, event_type: str) -> list[dict[str, Any]]:
        """The details of every event of a type, oldest first."""
        with _connect(self.dsn) as conn:
            self._ensure_schema(conn)
            rows = conn.execute("SELECT details FROM regal_audit.events WHERE event_type = %s ORDER BY seq",
                                (event_type,)).fetchall()
        return [json.loads(row[0]) for row in rows]

    def resources_of(self, event_type: str, outcome: str) -> list[str]:
        """The resources of every event of a type and outcome (e.g. the backups that completed)."""
        with _connect(self.dsn) as conn:
            self._ensure_schema(conn)
            rows = conn.execute("SELECT resource FROM regal_audit.events WHERE event_type = %s AND outcome = %s",
                                (event_type, outcome)).fetchall()
        return [row[0] for row in rows]

    def newest_details_about(self, event_type: str, field: str, target: str) -> dict[str, Any] | None:
        """The details of the newest event of a type whose details hold `field` about `target` (its "target")."""
        with _connect(self.dsn) as conn:
            self._ensure_schema(conn)
            row = conn.execute("SELECT details FROM regal_audit.events WHERE event_type = %s AND "
                               "details::jsonb -> %s ->> 'target' = %s ORDER BY seq DESC LIMIT 1",
                               (event_type, field, target)).fetchone()
        return None if row is None else json.loads(row[0])

    def last_outcome(self, event_type: str, resource: str) -> str | None:
        """The outcome of the newest event of a type about a resource (None: there is none)."""
        with _connect(self.dsn) as conn:
            self._ensure_schema(conn)
            row = conn.execute("SELECT outcome FROM regal_audit.events WHERE event_type = %s AND resource = %s "
                               "ORDER BY seq DESC LIMIT 1", (event_type, resource)).fetchone()
        return None if row is None else str(row[0])

    def sequenced_records(self, target: str) -> list[tuple[str, str, str, dict[str, Any]]]:
        """(event type, backup id, outcome, details) of the newest `verification` and `restore_test` event of
        each of a target's backups that names a record sequence (engine/record_sequence.py)."""
        with _reader(self.dsn) as conn:
            self._ensure_schema(conn)
            rows = conn.execute(
                "SELECT DISTINCT ON (event_type, resource) event_type, resource, outcome, details "
                "FROM regal_audit.events WHERE event_type IN ('verification', 'restore_test') "
                "AND split_part(resource, '-', 1) = %s AND (details::jsonb ->> 'sequence') IS NOT NULL "
                "ORDER BY event_type, resource, seq DESC", (target,)).fetchall()
        return [(str(kind), str(resource), str(outcome), json.loads(details))
                for kind, resource, outcome, details in rows]

    def events_about(self, event_types: tuple[str, ...], target: str) -> list[tuple[str, str, dict[str, Any]]]:
        """(event type, backup id, details) of every successful event of these types about a target's backups,
        oldest first (the legal holds and annotations: engine/holds.py)."""
        with _reader(self.dsn) as conn:
            self._ensure_schema(conn)
            rows = conn.execute(
                "SELECT event_type, resource, details FROM regal_audit.events WHERE event_type = ANY(%s) "
                "AND outcome = 'success' AND split_part(resource, '-', 1) = %s ORDER BY seq",
                (list(event_types), target)).fetchall()
        return [(str(kind), str(resource), json.loads(details)) for kind, resource, details in rows]

    def checkpoint(self, verdict: ChainVerdict) -> None:
        """Write the head a verification found intact into the repository (locked where the repository locks
        objects): the head that was checked, not whatever was appended since. Then the keyset takes it as its
        anchor, when it is newer than the one it holds (best effort: a keyset this user cannot write, or the
        keys lock held by another process, leaves the anchor behind, which is safe)."""
        if not verdict.ok or verdict.head_seq is None or verdict.head_hash is None:
            return
        head = verdict.head_seq
        body = {"format": "regal-backup-audit-checkpoint", "version": 1, "seq": head,
                "hash": verdict.head_hash, "at": datetime.now(UTC).isoformat()}
        retain = datetime.now(UTC) + timedelta(
            days=31 * (self.policy.audit.retention_months if self.policy.audit else 12))
        write_document(self.repo, self.keyring, CHECKPOINT_KIND, audit_checkpoint_key(head), body, retain)
        anchor = Anchor(head, verdict.head_hash, len({*verdict.checkpointed, head}))

        def advanced(current: Keyring) -> Keyring | None:
            held = anchor_of(current, self.repository_id)
            return None if held is not None and held.seq >= head else current.with_audit_anchor(self.repository_id,
                                                                                                anchor.to_json())

        self._keyring = update_keyset(self.repo, self.keyring, advanced)

    def checkpoints(self) -> tuple[list[dict[str, Any]], list[str]]:
        """The checkpoints whose seal holds, and why each other one is refused (naming its file)."""
        points, refused = [], []
        for stored in sorted(self.repo.list(AUDIT_CHECKPOINTS), key=lambda s: s.key):
            try:
                points.append(read_document(self.repo, self.keyring, CHECKPOINT_KIND, stored.key))
            except IntegrityError as exc:
                refused.append(exc.message)
        return points, refused


@dataclass(frozen=True)
class Anchor:
    """The newest audit checkpoint a keyset wrote or saw: its entry, that entry's hash, and how many authentic
    checkpoints up to it the repository held then. Kept in the keyset (authenticated with the master key),
    where neither a repository writer without the keys nor the audit database's owner can change it."""

    seq: int
    hash: str
    checkpoints: int

    def to_json(self) -> dict[str, Any]:
        return {"seq": self.seq, "hash": self.hash, "checkpoints": self.checkpoints}


def anchor_of(keyring: Keyring, repository_id: str) -> Anchor | None:
    """The keyset's audit anchor for a repository (None: it has none yet there, a keyset from before anchors,
    a new one, or another machine's copy that never wrote a checkpoint)."""
    held = keyring.audit_anchors.get(repository_id)
    if not held:
        return None
    return Anchor(int(held["seq"]), str(held["hash"]), int(held.get("checkpoints") or 0))  # type: ignore[call-overload]


@dataclass
class ChainVerdict:
    ok: bool
    entries: int
    head_seq: int | None
    head_hash: str | None
    first_bad_seq: int | None = None
    problem: str | None = None
    oldest: datetime | None = None
    checkpoints: int = 0
    spooled: int = 0
    notes: list[str] = field(default_factory=list)
    checkpointed: tuple[int, ...] = ()  # the entries the authentic checkpoints hold
    anchor: Anchor | None = None  # the keyset's, when verify_trail compared it
    # The authentic checkpoint the walk resumed from (`seq`, `at`): the entries up to it were recomputed when it was
    # written; from it on they are recomputed now. None: the walk started at the first entry.
    resumed_from: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "entries": self.entries, "head_seq": self.head_seq, "head_hash": self.head_hash,
                "first_bad_seq": self.first_bad_seq, "problem": self.problem,
                "oldest": self.oldest.isoformat() if self.oldest else None, "checkpoints": self.checkpoints,
                "spooled": self.spooled,
                "resumed_from_seq": self.resumed_from["seq"] if self.resumed_from else None,
                "resumed_from_at": self.resumed_from["at"] if self.resumed_from else None}


def verify_chain(events: list[AuditEvent], checkpoints: list[dict[str, Any]], resume: dict[str, Any] | None = None,
                 earlier: dict[int, str] | None = None, oldest: datetime | None = None) -> ChainVerdict:
    """Walk the chain from the first entry; name the first one that was edited, deleted, inserted or moved.

    `resume`: an authentic checkpoint; `events` then start at its entry, which must still have the checkpointed hash
    and recompute to it, and are walked from there; `earlier` holds the stored hashes of the entries before it that
    other checkpoints name (compared with them), `oldest` the time of the first entry."""
    def broken(seq: int | None, problem: str) -> ChainVerdict:
        return ChainVerdict(False, events[-1].seq if resume and events else len(events),
                            events[-1].seq if events else None, events[-1].hash if events else None, seq, problem,
                            oldest if resume else events[0].at if events else None, len(checkpoints),
                            resumed_from=resume and {"seq": resume["seq"], "at": resume["at"]})

    prev, expected_seq, walk = GENESIS, 1, events
    if resume is not None:
        seq, first = resume["seq"], events[0] if events else None
        if first is None or first.seq != seq:
            return broken(seq, f"entry {seq}, checkpointed at {resume['at']}, is gone "
                               "(the end of the trail was deleted)")
        if first.chained_hash(first.prev_hash) != first.hash:
            return broken(seq, f"entry {seq} ({first.event_type} of {first.resource} at {first.at:%Y-%m-%d %H:%M:%S} "
                               "UTC) was edited: its content does not match its hash")
        prev, expected_seq, walk = first.hash, seq + 1, events[1:]
    for event in walk:
        if event.seq != expected_seq:
            what = "deleted" if event.seq > expected_seq else "inserted or reordered"
            return broken(expected_seq, f"entry {expected_seq} is missing: the next entry is {event.seq} "
                                        f"(entries were {what})")
        if event.prev_hash != prev:
            return broken(event.seq, f"entry {event.seq} does not follow entry {event.seq - 1} "
                                     "(an entry before it was deleted, inserted or reordered)")
        if event.chained_hash(prev) != event.hash:
            return broken(event.seq, f"entry {event.seq} ({event.event_type} of {event.resource} at "
                                     f"{event.at:%Y-%m-%d %H:%M:%S} UTC) was edited: its content does not match "
                                     "its hash")
        prev, expected_seq = event.hash, expected_seq + 1
    by_seq = {**(earlier or {}), **{e.seq: e.hash for e in events}}
    for point in checkpoints:
        if point["seq"] not in by_seq:
            return broken(point["seq"], f"entry {point['seq']}, checkpointed at {point['at']}, is gone "
                                        "(the end of the trail was deleted)")
        if by_seq[point["seq"]] != point["hash"]:
            return broken(point["seq"], f"entry {point['seq']} differs from its checkpoint of {point['at']} "
                                        "(the trail was rewritten)")
    return ChainVerdict(True, events[-1].seq if resume and events else len(events),
                        events[-1].seq if events else None, events[-1].hash if events else None,
                        oldest=oldest if resume else events[0].at if events else None, checkpoints=len(checkpoints),
                        checkpointed=tuple(sorted(by_seq.keys() & {p["seq"] for p in checkpoints})),
                        resumed_from=resume and {"seq": resume["seq"], "at": resume["at"]})


def verify_against_anchor(verdict: ChainVerdict, events: list[AuditEvent] | dict[int, str],
                          anchor: Anchor | None) -> ChainVerdict:
    """An intact chain's verdict, compared with the keyset's anchor: the anchored entry must still have its hash
    (else the trail was rewritten: named, between the newest checkpoint that still matches and the anchor),
    and the repository must still hold the anchored checkpoint and as many checkpoints up to it as the keyset
    saw (else checkpoint files were deleted or rolled back). An anchor behind the repository's checkpoints (an
    older copy of the keyset on another machine) is simply older: the checkpoints after it are compared with
    the chain as every checkpoint is."""
    if not verdict.ok or anchor is None:
        return replace(verdict, anchor=anchor)
    seq, key, kept = anchor.seq, audit_checkpoint_key(anchor.seq), verdict.checkpointed
    chain = {e.seq: e.hash for e in events} if isinstance(events, list) else events
    gone = "" if seq in kept else f"; its checkpoint file {key} was deleted from the repository as well"
    first_bad: int | None = seq
    if seq not in chain:
        problem = (f"entry {seq}, whose hash the keyset holds (audit checkpoint anchor), is gone: the end of the "
                   f"trail was deleted{gone}")
    elif chain[seq] != anchor.hash:
        matching = max((s for s in kept if s < seq), default=0)
        since = (f"entry {matching}, the newest checkpoint before it, still matches" if matching
                 else "no checkpoint before it is left")
        problem = (f"entry {seq} differs from the hash the keyset holds of it (audit checkpoint anchor): the trail "
                   f"was rewritten from one of entries {matching + 1} to {seq} ({since}){gone}")
    elif seq not in kept:
        problem = (f"the checkpoint {key} of entry {seq}, which the keyset holds (audit checkpoint anchor), is gone "
                   "from the repository: checkpoint files were deleted or rolled back")
    elif (held := sum(1 for s in kept if s <= seq)) < anchor.checkpoints:
        first_bad = None
        problem = (f"the repository holds {held} audit checkpoint(s) up to entry {seq} but the keyset saw "
                   f"{anchor.checkpoints} (audit checkpoint anchor): checkpoint files were deleted")
    else:
        return replace(verdict, anchor=anchor)
    return replace(verdict, ok=False, first_bad_seq=first_bad, problem=problem, anchor=anchor)


def verify_trail(trail: AuditTrail, events: list[AuditEvent] | None = None, *, full: bool = False,
                 resume_before: datetime | None = None) -> ChainVerdict:
    """The chain's verdict; `events`: the whole trail, when the caller has already read it. A checkpoint that
    fails authentication breaks the verdict too, blamed on the checkpoint file, not on the database; so does
    a difference from the keyset's anchor (checkpoint files deleted or rolled back, the trail rewritten).

    Unless `full`, the walk resumes from the newest authentic checkpoint (sealed with the keyset: nobody without
    the keys wrote it; it was written only after a walk found the chain intact up to its entry): that entry must
    still hold the checkpointed hash and recompute to it, and every entry after it is recomputed and linked as in
    a full walk. The entries before it were recomputed when it was written; now the database checks that they are
    all still there, in order, each linked to the one before (an entry deleted, inserted or moved is named), and
    each other checkpoint and the keyset's anchor are compared with the entries they name; only an edit of an
    entry's content that keeps its stored hashes needs `full` to be found. `resume_before`: resume only from a
    checkpoint whose entry is older than this (a report recomputes every entry of its period). With no authentic
    checkpoint, or any refused, the walk starts at the first entry."""
    points, refused = trail.checkpoints()
    anchor = anchor_of(trail.keyring, trail.repository_id)
    resume = None if full or refused else _resume_point(points, events, resume_before)
    if resume is not None:
        tail = ([e for e in events if e.seq >= resume["seq"]] if events is not None
                else trail.events_from(resume["seq"]))
        named = {p["seq"] for p in points if p["seq"] < resume["seq"]} | (
            {anchor.seq} if anchor is not None and anchor.seq < resume["seq"] else set())
        if events is not None:
            earlier = {e.seq: e.hash for e in events if e.seq in named}
            oldest = events[0].at if events else None
        else:
            earlier, oldest = trail.hashes_of(named)
        if events is not None:
            links = [(e.seq, e.prev_hash, b.seq if b else None, b.hash if b else None)
                     for b, e in zip([None, *events], events, strict=False) if e.seq <= resume["seq"]
                     and (e.seq != (b.seq if b else 0) + 1 or e.prev_hash != (b.hash if b else GENESIS))][:1]
        else:
            links = trail.links_up_to(resume["seq"])
        verdict = verify_chain(tail, points, resume, earlier, oldest)
        if verdict.ok and links:  # an entry before the checkpoint deleted, inserted or moved since it was written
            seq, _, before_seq, _ = links[0]
            expected = (before_seq or 0) + 1
            verdict = replace(verdict, ok=False, first_bad_seq=min(seq, expected), problem=(
                f"entry {expected} is missing: the next entry is {seq} (entries were deleted)" if seq > expected
                else f"entry {seq} does not follow entry {seq - 1} (an entry before it was deleted, inserted or "
                     "reordered)"))
        chain: list[AuditEvent] | dict[int, str] = {**earlier, **{e.seq: e.hash for e in tail}}
    else:
        events = trail.events() if events is None else events
        verdict, chain = verify_chain(events, points), events
    if verdict.ok and refused:
        verdict = replace(verdict, ok=False, problem=f"a checkpoint in the repository is refused: {refused[0]}")
    verdict = verify_against_anchor(verdict, chain, anchor)
    verdict.spooled = sum(1 for _ in trail.repo.list(AUDIT_SPOOL))
    return verdict


def _resume_point(points: list[dict[str, Any]], events: list[AuditEvent] | None,
                  before: datetime | None) -> dict[str, Any] | None:
    """The newest authentic checkpoint to resume from (None: walk from the first entry). With `before`, only
    one whose entry is older than that moment (known from `events`)."""
    if before is not None:
        if events is None:
            return None
        first_after = min((e.seq for e in events if e.at >= before), default=None)
        points = [p for p in points if first_after is None or p["seq"] < first_after]
    return max(points, key=lambda p: p["seq"], default=None)


def _chained_as(conn, event: AuditEvent) -> int | None:
    """The entry a spooled event already is in the chain (None: not yet). By its unique id; an event spooled
    before events had one, by its time (in microseconds), process (with its pid), type, resource and details."""
    if event.event_id is not None:
        row = conn.execute("SELECT seq FROM regal_audit.events WHERE event_id = %s", (event.event_id,)).fetchone()
    else:
        row = conn.execute("SELECT seq FROM regal_audit.events WHERE at = %s AND process = %s AND event_type = %s "
                           "AND resource = %s AND details = %s",
                           (event.at, event.process, event.event_type, event.resource, event.details)).fetchone()
    return None if row is None else int(row[0])


def completed_backups(policy: Policy, repo: Repository) -> set[str]:
    """The backups the audit trail saw complete (none when there is no trail or it cannot be reached): a
    backup directory among them without its manifest was damaged, not interrupted."""
    if policy.audit is None:
        return set()
    try:
        return set(AuditTrail(policy, repo).resources_of("backup", "success"))
    except RegalError:
        return set()


# --- recording from the engine ---------------------------------------------------------------------

def record(policy: Policy, repo: Repository | None, event_type: str, resource: str, outcome: str = "success",
           details: dict[str, Any] | None = None, trigger: dict[str, str] | None = None) -> None:
    """Record one event when the policy keeps an audit trail. Never raises: an operation is not lost for
    its audit (the event waits in the repository's spool when the database is down)."""
    if policy.audit is None:
        return
    from .storage import open_repository

    with contextlib.suppress(RegalError):
        AuditTrail(policy, repo or open_repository(policy)).append(event_type, resource, outcome, details or {},
                                                                   trigger)


@contextlib.contextmanager
def audited(policy: Policy, repo: Repository | None, event_type: str, resource: str,
            trigger: dict[str, str] | None = None) -> Iterator[dict[str, Any]]:
    """Record the operation in the block as one event: success, or failure with the error's message (our
    errors carry no secrets; for any other exception only its type is kept). Yields the details dict;
    the block may set details["resource"] (known only inside) and details["outcome"] ("failure" without
    an exception, e.g. a restore whose validation failed)."""
    details: dict[str, Any] = {}
    try:
        yield details
    except BaseException as exc:
        error = exc.message if isinstance(exc, RegalError) else type(exc).__name__
        if isinstance(exc, RegalError) and exc.protective:
            details["refused"] = True  # it protected data: not a failed operation
        record(policy, repo, event_type, details.pop("resource", resource), "failure", {**details, "error": error},
               trigger)
        raise
    outcome = details.pop("outcome", "success")
    record(policy, repo, event_type, details.pop("resource", resource), outcome, details, trigger)
