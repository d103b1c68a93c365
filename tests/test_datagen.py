"""The point-of-sale demo data, generated into a real scratch PostgreSQL server."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator

import psycopg
import pytest

from regal_dagster.demo.datagen import TABLES, create_pos_database, scaled_counts
from regal_dagster.engine.errors import RegalError
from regal_dagster.engine.postgresql.server import ScratchCluster

SCALE = 0.01


@pytest.fixture(scope="module")
def server() -> Iterator[ScratchCluster]:
    with ScratchCluster() as c:
        yield c


@pytest.fixture(scope="module")
def pos(server: ScratchCluster) -> tuple[str, dict[str, int]]:
    """A database generated once at scale 0.01 with the default seed, and the returned counts."""
    dsn = server.create_database("pos_default")
    return dsn, create_pos_database(dsn, SCALE)


def _scalar(conn: psycopg.Connection, query: str) -> object:
    row = conn.execute(query).fetchone()
    assert row is not None
    return row[0]


def _checksums(dsn: str) -> dict[str, str]:
    with psycopg.connect(dsn) as conn:
        return {
            t: str(_scalar(conn, f"SELECT md5(string_agg(x::text, '|' ORDER BY x.id)) FROM public.{t} AS x"))
            for t in TABLES
        }


def test_counts_follow_the_scale(pos: tuple[str, dict[str, int]]) -> None:
    _, counts = pos
    planned = scaled_counts(SCALE)
    assert list(counts) == list(TABLES)
    for table in ("stores", "employees", "customers", "products", "orders", "payments"):
        assert counts[table] == planned[table]
    assert counts["customers"] == 200 and counts["orders"] == 1000
    assert counts["payments"] == counts["orders"]
    assert 2.5 * counts["orders"] < counts["order_items"] < 3.5 * counts["orders"]
    assert counts["customers"] < counts["orders"] and counts["products"] < counts["customers"]


def test_foreign_keys_hold_and_are_declared(pos: tuple[str, dict[str, int]]) -> None:
    dsn, _ = pos
    orphans = {
        "order without its store": "SELECT count(*) FROM orders o LEFT JOIN stores s ON s.id = o.store_id "
        "WHERE s.id IS NULL",
        "order without its customer": "SELECT count(*) FROM orders o "
        "LEFT JOIN customers c ON c.id = o.customer_id WHERE c.id IS NULL",
        "employee of another store": "SELECT count(*) FROM orders o JOIN employees e ON e.id = o.employee_id "
        "WHERE e.store_id <> o.store_id",
        "item without its order": "SELECT count(*) FROM order_items i LEFT JOIN orders o ON o.id = i.order_id "
        "WHERE o.id IS NULL",
        "item without its product": "SELECT count(*) FROM order_items i "
        "LEFT JOIN products p ON p.id = i.product_id WHERE p.id IS NULL",
        "payment without its order": "SELECT count(*) FROM payments p LEFT JOIN orders o ON o.id = p.order_id "
        "WHERE o.id IS NULL",
        "order without items": "SELECT count(*) FROM orders o "
        "WHERE NOT EXISTS (SELECT 1 FROM order_items i WHERE i.order_id = o.id)",
        "total that is not the sum of its items": "SELECT count(*) FROM orders o JOIN (SELECT order_id, "
        "sum(quantity * unit_price - discount) AS s FROM order_items GROUP BY order_id) t "
        "ON t.order_id = o.id WHERE t.s <> o.total",
        "payment that does not match its order": "SELECT count(*) FROM payments p JOIN orders o "
        "ON o.id = p.order_id WHERE p.amount <> o.total OR p.paid_at < o.ordered_at",
    }
    with psycopg.connect(dsn) as conn:
        for what, query in orphans.items():
            assert _scalar(conn, query) == 0, what
        foreign_keys = _scalar(
            conn,
            "SELECT count(*) FROM pg_constraint WHERE contype = 'f' "
            "AND connamespace = 'public'::regnamespace",
        )
        primary_keys = _scalar(
            conn,
            "SELECT count(*) FROM pg_constraint WHERE contype = 'p' "
            "AND connamespace = 'public'::regnamespace",
        )
        indexes = {r[0] for r in conn.execute("SELECT indexname FROM pg_indexes WHERE schemaname = 'public'")}
        email_unique = _scalar(
            conn, "SELECT indisunique FROM pg_index WHERE indexrelid = 'public.customers_email_key'::regclass"
        )
    assert foreign_keys == 7
    assert primary_keys == len(TABLES)
    assert {"orders_customer_id_idx", "orders_ordered_at_idx", "payments_order_id_idx"} <= indexes
    assert email_unique is True


def test_values_look_like_a_shop(pos: tuple[str, dict[str, int]]) -> None:
    dsn, _ = pos
    with psycopg.connect(dsn) as conn:
        names = {r[0] for r in conn.execute("SELECT full_name FROM customers")}
        tokens = [r[0] for r in conn.execute("SELECT card_token FROM payments WHERE method = 'card'")]
        cash_tokens = _scalar(conn, "SELECT count(card_token) FROM payments WHERE method = 'cash'")
        last4 = _scalar(
            conn, "SELECT bool_and(card_last4 ~ '^[0-9]{4}$') FROM payments WHERE method = 'card'"
        )
        price_type = _scalar(
            conn,
            "SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
            "WHERE attrelid = 'public.products'::regclass AND attname = 'price'",
        )
        analyzed = _scalar(conn, "SELECT count(*) FROM pg_stat_user_tables WHERE last_analyze IS NOT NULL")
        statuses = {r[0] for r in conn.execute("SELECT DISTINCT status FROM orders")}
        next_id = _scalar(
            conn,
            "INSERT INTO orders (store_id, employee_id, customer_id, ordered_at, receipt_no, "
            "channel, status, total) VALUES (1, 1, 1, now(), 'R-new', 'in_store', "
            "'pending', 0) RETURNING id",
        )
        conn.rollback()
    assert {"José Müller", "Zoë Ægir", "李雷"} <= names
    assert tokens and all(re.fullmatch(r"tok_[0-9a-f]{24}", t) for t in tokens)
    assert len(set(tokens)) == len(tokens)
    assert cash_tokens == 0 and last4 is True
    assert price_type == "numeric(10,2)"
    assert analyzed == len(TABLES)
    assert statuses == {"completed", "refunded", "cancelled", "pending"}
    assert next_id == 1001  # identity sequences continue after the generated rows


def test_same_seed_gives_the_same_data_and_another_seed_does_not(
    server: ScratchCluster, pos: tuple[str, dict[str, int]]
) -> None:
    default_dsn, _ = pos
    again = server.create_database("pos_again")
    other = server.create_database("pos_other")
    create_pos_database(again, SCALE, seed=42)
    create_pos_database(other, SCALE, seed=43)
    assert _checksums(again) == _checksums(default_dsn)
    different = _checksums(other)
    assert all(different[t] != _checksums(default_dsn)[t] for t in ("customers", "orders", "payments"))


def test_refuses_existing_tables_unless_replace(server: ScratchCluster) -> None:
    dsn = server.create_database("pos_replace")
    first = create_pos_database(dsn, 0.002, seed=1)
    with pytest.raises(RegalError) as info:
        create_pos_database(dsn, 0.002, seed=1)
    assert "already has point-of-sale tables" in info.value.message and info.value.hint
    with psycopg.connect(dsn) as conn:  # the refused run changed nothing
        assert _scalar(conn, "SELECT count(*) FROM orders") == first["orders"]
    second = create_pos_database(dsn, 0.003, seed=1, replace=True)
    assert second["orders"] == 300 and second["customers"] == 60


def test_tiny_scale_gives_at_least_one_row_per_table(server: ScratchCluster) -> None:
    counts = create_pos_database(server.create_database("pos_tiny"), 0.00001)
    assert counts["orders"] == 1 and counts["payments"] == 1
    assert all(n >= 1 for n in counts.values())


@pytest.mark.parametrize("scale", [0, -1, math.nan, math.inf])
def test_rejects_a_scale_that_is_not_positive(scale: float) -> None:
    with pytest.raises(RegalError):
        create_pos_database("postgresql://postgres@127.0.0.1:1/none", scale)
