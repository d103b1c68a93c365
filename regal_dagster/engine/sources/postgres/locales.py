"""The restored database's locale: the source's collation provider, collation, ctype, ICU locale and ICU rules,
stated in full in its CREATE DATABASE whatever the target server's defaults (pg_dump -C does the same), and
a target that cannot provide them refused before anything is created.

A libc database created on a server whose template0 uses ICU (15+) or the builtin provider (17+) would
otherwise get that provider: the same bytes, but another ORDER BY, other index order, other range partitions.
`--use-target-locale` restores with the target's defaults instead (said in the restore's output)."""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql

from ...errors import RegalError
from ...postgresql.connection import connect, describe_dsn, server_major, with_dbname

LOCALE_KEYS = ("lc_collate", "lc_ctype", "locale_provider", "locale", "icu_rules")
USE_TARGET_LOCALE_HINT = ("restore onto a server that has it, or pass --use-target-locale to restore with the target "
                          "server's default provider and locale instead (text then sorts and compares as the target's "
                          "locale says: ORDER BY, indexes and text range partitions may differ from the source)")


def without_locale(properties: dict[str, Any]) -> dict[str, Any]:
    """The database's properties with its locale left out: created with the target server's defaults."""
    return {key: value for key, value in properties.items() if key not in LOCALE_KEYS}


def provider_of(properties: dict[str, Any]) -> str:
    return str(properties.get("locale_provider") or "libc")


def locale_clause(properties: dict[str, Any], server_major_version: int) -> list[sql.Composable]:
    """LC_COLLATE, LC_CTYPE and (from PostgreSQL 15 on, where a database has one) LOCALE_PROVIDER with its ICU
    or builtin locale and ICU rules, for CREATE DATABASE; nothing when the properties carry no locale."""
    if "lc_collate" not in properties:
        return []
    clause: list[sql.Composable] = [sql.SQL("LC_COLLATE {} LC_CTYPE {}").format(
        sql.Literal(properties["lc_collate"]), sql.Literal(properties["lc_ctype"]))]
    provider = provider_of(properties)
    if provider == "icu":
        clause.append(sql.SQL("LOCALE_PROVIDER icu ICU_LOCALE {}").format(sql.Literal(properties["locale"])))
        if properties.get("icu_rules"):
            clause.append(sql.SQL("ICU_RULES {}").format(sql.Literal(properties["icu_rules"])))
    elif provider == "builtin":
        clause.append(sql.SQL("LOCALE_PROVIDER builtin BUILTIN_LOCALE {}").format(sql.Literal(properties["locale"])))
    elif server_major_version >= 15:  # libc, said: else template0's provider (ICU or builtin) is taken
        clause.append(sql.SQL("LOCALE_PROVIDER libc"))
    return clause


def describe_locale(properties: dict[str, Any]) -> str:
    if "lc_collate" not in properties:
        return f"encoding {properties['encoding']}, the target server's default locale"
    provider = provider_of(properties)
    locale = f"provider {provider}, LC_COLLATE {properties['lc_collate']}, LC_CTYPE {properties['lc_ctype']}"
    if provider != "libc":
        locale += f", {provider} locale {properties.get('locale')}"
    if properties.get("icu_rules"):
        locale += f", ICU rules {properties['icu_rules']!r}"
    return f"encoding {properties['encoding']}, {locale}"


def _probe(conn: psycopg.Connection[Any], options: sql.Composable) -> str | None:
    """The server's reason why it cannot create a collation with `options` (None when it can): in a
    transaction that is rolled back, so nothing is left behind."""
    try:
        with conn.transaction(force_rollback=True):
            conn.execute(sql.SQL("CREATE COLLATION pg_temp.regal_locale_probe ({})").format(options))
    except psycopg.errors.InsufficientPrivilege:
        return None  # no TEMP here: CREATE DATABASE will tell
    except psycopg.Error as exc:
        text = str(exc).strip()
        return text.splitlines()[0] if text else type(exc).__name__
    return None


def missing_locale(conn: psycopg.Connection[Any], properties: dict[str, Any]) -> list[str]:
    """What of the source database's locale the server of `conn` cannot provide, one sentence each."""
    major = server_major(conn)
    provider = provider_of(properties)
    missing = []
    if provider == "icu":
        if major < 15:
            return [f"ICU as a database's collation provider (PostgreSQL {major}; databases have it from 15 on)"]
        if properties.get("icu_rules") and major < 16:
            missing.append(f"ICU rules (PostgreSQL {major}; from 16 on)")
        if reason := _probe(conn, sql.SQL("provider = icu, locale = {}").format(sql.Literal(properties["locale"]))):
            missing.append(f"ICU locale {properties['locale']} ({reason})")
    elif provider == "builtin":
        if major < 17:
            return [f"the builtin collation provider (PostgreSQL {major}; from 17 on)"]
        if reason := _probe(conn, sql.SQL("provider = builtin, locale = {}").format(
                sql.Literal(properties["locale"]))):
            missing.append(f"builtin locale {properties['locale']} ({reason})")
    for what in dict.fromkeys((properties["lc_collate"], properties["lc_ctype"])):
        if reason := _probe(conn, sql.SQL("provider = libc, locale = {}").format(sql.Literal(what))):
            missing.append(f"the operating system locale {what} ({reason})")
    return missing


def check_target_locale(dsn: str, properties: dict[str, Any]) -> None:
    """Refuse, before anything is created, a server that cannot create the database with the source's locale."""
    if "lc_collate" not in properties:
        return
    with connect(with_dbname(dsn, "postgres"), autocommit=True) as conn:
        missing = missing_locale(conn, properties)
    if missing:
        raise RegalError(f"the server of {describe_dsn(dsn)} cannot create the database with the backup's locale "
                         f"({describe_locale(properties)}): it lacks {'; '.join(missing)}; nothing was restored",
                         USE_TARGET_LOCALE_HINT)


def database_locale(conn: psycopg.Connection[Any]) -> dict[str, Any]:
    """The locale of the database `conn` is connected to, as database_properties records it."""
    version = conn.info.server_version
    provider = "d.datlocprovider::text" if version >= 150000 else "'c'"
    locale = "d.datlocale" if version >= 170000 else "d.daticulocale" if version >= 150000 else "NULL"
    rules = "d.daticurules" if version >= 160000 else "NULL"
    row = conn.execute(f"SELECT d.datcollate, d.datctype, {provider}, {locale}, {rules} FROM pg_database d "
                       "WHERE d.datname = current_database()").fetchone()
    assert row is not None
    collate, ctype, code, icu_or_builtin, icu_rules = row
    return {"lc_collate": collate, "lc_ctype": ctype,
            "locale_provider": {"c": "libc", "i": "icu", "b": "builtin"}.get(code, code),
            "locale": icu_or_builtin, "icu_rules": icu_rules}
