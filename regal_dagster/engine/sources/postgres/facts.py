"""What a logical backup records about the database beside its rows, read from the server's catalogs: the
database's own properties (encoding, locale, owner, settings, comment, grants), the tablespaces and roles it
refers to, and what a server needs to hold it (ICU, xml, lz4, extensions). A restore recreates them
(database.py, roles.py)."""

from __future__ import annotations

from typing import Any

import psycopg

from ...errors import RegalError
from .locales import database_locale


def database_properties(conn: psycopg.Connection[Any]) -> dict[str, Any]:
    """What CREATE DATABASE and ALTER DATABASE need to recreate this database as it is: encoding, locale
    and collation provider, owner, comment, grants, connection limit and its settings."""
    row = conn.execute("""
        SELECT pg_encoding_to_char(d.encoding), pg_get_userbyid(d.datdba), shobj_description(d.oid, 'pg_database'),
               d.datacl::text[], d.datconnlimit, d.oid::int8
        FROM pg_database d WHERE d.datname = current_database()""").fetchone()
    assert row is not None
    encoding, owner, comment, acl, connlimit, oid = row
    settings = [{"role": role, "settings": list(config)} for role, config in conn.execute("""
        SELECT CASE WHEN s.setrole = 0 THEN NULL ELSE pg_get_userbyid(s.setrole) END, s.setconfig
        FROM pg_db_role_setting s WHERE s.setdatabase = %s::oid ORDER BY 1 NULLS FIRST""", (oid,)).fetchall()]
    return {"encoding": encoding, **database_locale(conn), "owner": owner, "comment": comment, "acl": list(acl or []),
            "connection_limit": connlimit, "settings": settings}


def used_tablespaces(conn: psycopg.Connection[Any]) -> list[dict[str, Any]]:
    """The tablespaces this database's tables and indexes live in besides the server's default one, and the
    database's own default tablespace when it is not pg_default: name, location, owner, options, grants and
    comment (what CREATE TABLESPACE needs on a new server)."""
    rows = conn.execute("""
        WITH db AS (SELECT oid, dattablespace FROM pg_database WHERE datname = current_database()),
        used AS (SELECT DISTINCT c.reltablespace AS oid FROM pg_class c WHERE c.reltablespace <> 0
                 UNION SELECT dattablespace FROM db)
        SELECT t.spcname, pg_tablespace_location(t.oid), pg_get_userbyid(t.spcowner), t.spcoptions::text[],
               t.spcacl::text[], shobj_description(t.oid, 'pg_tablespace'), t.oid = db.dattablespace
        FROM pg_tablespace t JOIN used u ON u.oid = t.oid, db
        WHERE t.spcname NOT IN ('pg_default', 'pg_global') ORDER BY 1""").fetchall()
    return [{"name": name, "location": location, "owner": owner, "options": list(options or []),
             "acl": list(acl or []), "comment": comment, "database_default": database_default}
            for name, location, owner, options, acl, comment, database_default in rows]


ROLE_ATTRIBUTES = ("rolsuper", "rolinherit", "rolcreaterole", "rolcreatedb", "rolcanlogin", "rolreplication",
                   "rolbypassrls")


def referenced_roles(conn: psycopg.Connection[Any], passwords: bool = False) -> dict[str, Any]:
    """The roles this database refers to (its owner, the owners of its objects, the grantees of its
    privileges, the roles of its policies and settings) and every role they are members of, with their
    attributes and memberships: what a restore onto a fresh server must create first. Password hashes
    only when asked for (they need a superuser to read)."""
    cur = conn.execute("""
        WITH RECURSIVE db AS (SELECT oid FROM pg_database WHERE datname = current_database()),
        direct AS (
            SELECT refobjid AS oid FROM pg_shdepend, db WHERE refclassid = 'pg_authid'::regclass
              AND (dbid = db.oid OR (dbid = 0 AND classid = 'pg_database'::regclass AND objid = db.oid))
            UNION SELECT datdba FROM pg_database, db WHERE pg_database.oid = db.oid
            UNION SELECT setrole FROM pg_db_role_setting, db WHERE setdatabase = db.oid AND setrole <> 0),
        closure AS (SELECT oid FROM direct
                    UNION SELECT m.roleid FROM pg_auth_members m JOIN closure c ON m.member = c.oid)
        SELECT oid FROM closure""")
    oids = [int(oid) for (oid,) in cur.fetchall()]
    source = "pg_authid" if passwords else "pg_roles"
    password = "r.rolpassword" if passwords else "NULL"
    attributes = ", ".join(f"r.{a}" for a in ROLE_ATTRIBUTES)
    try:
        rows = conn.execute(f"""
            SELECT r.oid::int8, r.rolname, {attributes}, r.rolconnlimit, r.rolvaliduntil::text, {password},
                   (SELECT array_agg(c ORDER BY c) FROM unnest(s.setconfig) c), shobj_description(r.oid, 'pg_authid')
            FROM {source} r LEFT JOIN pg_db_role_setting s ON s.setrole = r.oid AND s.setdatabase = 0
            WHERE r.oid = ANY(%s::oid[]) ORDER BY r.rolname""", (oids,)).fetchall()
    except psycopg.errors.InsufficientPrivilege:
        raise RegalError("the policy asks for role password hashes, but only a superuser can read them",
                         "back up as a superuser, or set role_passwords: false for this target") from None
    roles = []
    for oid, name, *values in rows:
        flags = dict(zip(ROLE_ATTRIBUTES, values[:len(ROLE_ATTRIBUTES)], strict=True))
        connlimit, valid_until, password_hash, settings, comment = values[len(ROLE_ATTRIBUTES):]
        role = {"name": name, **{k[3:]: v for k, v in flags.items()}, "connection_limit": connlimit,
                "valid_until": valid_until, "settings": list(settings or []), "comment": comment,
                "builtin": oid < 16384}  # the bootstrap superuser and the predefined pg_* roles
        if passwords:
            role["password_hash"] = password_hash
        roles.append(role)
    memberships = [{"role": role, "member": member, "admin_option": admin} for role, member, admin in conn.execute("""
        SELECT pg_get_userbyid(m.roleid), pg_get_userbyid(m.member), m.admin_option FROM pg_auth_members m
        WHERE m.member = ANY(%s::oid[]) ORDER BY 1, 2""", (oids,)).fetchall()]
    return {"roles": roles, "memberships": memberships, "password_hashes": passwords}


def server_needs(conn: psycopg.Connection[Any]) -> list[str]:
    """What a server must have to hold this database: icu (ICU collations in use), libxml (xml columns),
    lz4 (lz4-compressed columns), extension:NAME (each extension installed)."""
    version = conn.info.server_version
    provider = "d.datlocprovider = 'i'" if version >= 150000 else "false"
    lz4 = ("EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid >= 16384 AND attcompression = 'l')"
           if version >= 140000 else "false")
    row = conn.execute(f"""
        SELECT (SELECT {provider} FROM pg_database d WHERE d.datname = current_database())
               OR EXISTS (SELECT 1 FROM pg_collation c WHERE c.collprovider = 'i' AND (c.oid >= 16384
                          OR c.oid IN (SELECT attcollation FROM pg_attribute WHERE attrelid >= 16384))),
               EXISTS (SELECT 1 FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
                       WHERE a.attrelid >= 16384 AND NOT a.attisdropped
                         AND (t.oid = 'xml'::regtype OR t.typelem = 'xml'::regtype OR t.typbasetype = 'xml'::regtype)),
               {lz4},
               ARRAY(SELECT extname::text FROM pg_extension WHERE extname <> 'plpgsql' ORDER BY 1)""").fetchone()
    assert row is not None
    icu, xml, compressed, extensions = row
    return [name for name, used in (("icu", icu), ("libxml", xml), ("lz4", compressed)) if used] + [
        f"extension:{e}" for e in extensions]
