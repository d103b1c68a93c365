"""GDPR erasures in a restored PostgreSQL database: the ledger's hashed identifiers matched in the server
(PostgreSQL computes the same salted SHA-256 with its built-in `sha256()`, so identifiers never leave
it), the rows deleted or their personal columns overwritten, and what still matches counted."""

from __future__ import annotations

from psycopg import sql

from ...erasure_ledger import ErasureLedger, ErasureResult
from ...postgresql.connection import OWN_SESSION_SETTINGS, connect
from ...settings import ErasureSubjectConfig

ERASURE_ID = "{erasure_id}"


def apply_erasures(dsn: str, ledger: ErasureLedger, target: str,
                   subjects: list[ErasureSubjectConfig]) -> ErasureResult:
    """Apply a target's erasures to a (restored) database; count what was erased and what remains."""
    erasures = ledger.for_target(target)
    erased, remaining = {}, {}
    hashes = [e.subject_hash for e in erasures]
    with connect(dsn, settings=OWN_SESSION_SETTINGS) as conn, conn.cursor() as cur:
        for subject in subjects:
            table = sql.Identifier(*subject.table.split(".", 1))
            subject_hash = sql.SQL("encode(sha256(convert_to({salt} || lower(btrim({col}::text)), 'UTF8')), "
                                   "'hex')").format(salt=sql.Literal(ledger.salt),
                                                    col=sql.Identifier(subject.match_column))
            matches = sql.SQL("{h} = ANY({hashes})").format(h=subject_hash, hashes=sql.Literal(hashes))
            cur.execute(_erase_statement(subject, table, subject_hash, matches))
            erased[subject.table] = cur.rowcount
            cur.execute(sql.SQL("SELECT count(*) FROM {t} WHERE {m}").format(t=table, m=matches))
            remaining[subject.table] = int(cur.fetchone()[0])  # type: ignore[index]
        conn.commit()
    return ErasureResult(len(erasures), erased, remaining)


def _erase_statement(subject: ErasureSubjectConfig, table: sql.Identifier, subject_hash: sql.Composable,
                     matches: sql.Composable) -> sql.Composed:
    if subject.action == "delete":
        return sql.SQL("DELETE FROM {t} WHERE {m}").format(t=table, m=matches)
    assignments: list[sql.Composable] = []
    for column, value in subject.set.items():
        expression: sql.Composable
        if isinstance(value, str) and ERASURE_ID in value:
            expression = sql.SQL("replace({v}, {marker}, left({h}, 16))").format(
                v=sql.Literal(value), marker=sql.Literal(ERASURE_ID), h=subject_hash)
        else:
            expression = sql.Literal(value)
        assignments.append(sql.SQL("{c} = {e}").format(c=sql.Identifier(column), e=expression))
    return sql.SQL("UPDATE {t} SET {a} WHERE {m}").format(t=table, a=sql.SQL(", ").join(assignments), m=matches)
