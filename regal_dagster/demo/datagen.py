"""The demo's point-of-sale database: stores, staff, customers (personal data), products, orders,
order items and card payments, generated inside PostgreSQL.

Every value is computed by the server from `generate_series` row numbers and `hashint8extended(row,
seed)`, so generation is fast (one INSERT ... SELECT per table), independent of row order, and the same
seed always gives the same data. Tables are loaded inside one transaction first and get their primary
keys, foreign keys and indexes afterwards (the way pg_restore does it), then ANALYZE runs.

Sizes: scale 1.0 is 50 stores, 500 employees, 20,000 customers, 2,000 products, 100,000 orders with
about 300,000 order items and one payment each. Measured with pg_database_size on PostgreSQL 18: 84 MB
at scale 1 (1.6 s to generate), 1.5 GB at scale 20 (34 s); size grows linearly with scale.
"""

from __future__ import annotations

import hashlib
import math

import psycopg

from ..engine.errors import RegalError

SCHEMA = "public"

TABLES: tuple[str, ...] = (
    "stores",
    "employees",
    "customers",
    "products",
    "orders",
    "order_items",
    "payments",
)
"""The generated tables, parents before children."""

BASE_COUNTS: dict[str, int] = {
    "stores": 50,
    "employees": 500,
    "customers": 20_000,
    "products": 2_000,
    "orders": 100_000,
    "payments": 100_000,
}
"""Rows per table at scale 1.0 (order_items follows from orders: 1 to 5 per order, 3 on average)."""

ANCHOR = "2025-06-30 20:00:00+00"
"""The 'now' of the generated history: orders fall in the two years before it (never the real clock)."""

SPECIAL_CUSTOMERS: tuple[tuple[str, str], ...] = (
    ("José Müller", "jose.muller"),
    ("Zoë Ægir", "zoe.aegir"),
    ("李雷", "li.lei"),
    ("Siobhán Ó Súilleabháin", "siobhan.osuilleabhain"),
    ("Renée Ångström", "renee.angstrom"),
)
"""(full name, e-mail local part) of the first customers: non-ASCII names a restore must keep intact."""

FIRST_NAMES: tuple[tuple[str, str], ...] = (
    ("Emma", "emma"), ("Liam", "liam"), ("Olivia", "olivia"), ("Noah", "noah"), ("Ava", "ava"),
    ("Lucas", "lucas"), ("Mia", "mia"), ("Oliver", "oliver"), ("Sophia", "sophia"), ("Elijah", "elijah"),
    ("Amelia", "amelia"), ("James", "james"), ("Isabella", "isabella"), ("Mateo", "mateo"),
    ("Charlotte", "charlotte"), ("Leo", "leo"), ("Harper", "harper"), ("Ethan", "ethan"),
    ("Chloé", "chloe"), ("François", "francois"), ("Søren", "soren"), ("Łukasz", "lukasz"),
    ("Björn", "bjorn"), ("Zoë", "zoe"), ("José", "jose"), ("Aoife", "aoife"), ("Małgorzata", "malgorzata"),
    ("Ana", "ana"), ("Priya", "priya"), ("Wei", "wei"), ("Yuki", "yuki"), ("Fatima", "fatima"),
    ("Omar", "omar"), ("Ngozi", "ngozi"), ("Mehmet", "mehmet"), ("Ines", "ines"), ("Hannah", "hannah"),
    ("Daniel", "daniel"), ("Sara", "sara"), ("Tomás", "tomas"),
)  # fmt: skip

LAST_NAMES: tuple[tuple[str, str], ...] = (
    ("Smith", "smith"), ("Johnson", "johnson"), ("Müller", "muller"), ("García", "garcia"),
    ("Nowak", "nowak"), ("Rossi", "rossi"), ("Kowalski", "kowalski"), ("Dubois", "dubois"),
    ("Novák", "novak"), ("O'Brien", "obrien"), ("Nguyen", "nguyen"), ("Kim", "kim"), ("Patel", "patel"),
    ("Jensen", "jensen"), ("Silva", "silva"), ("Andersson", "andersson"), ("Ødegaard", "odegaard"),
    ("Fernández", "fernandez"), ("Yılmaz", "yilmaz"), ("Brown", "brown"), ("Wilson", "wilson"),
    ("Taylor", "taylor"), ("Murphy", "murphy"), ("Schmidt", "schmidt"), ("Horváth", "horvath"),
    ("Okafor", "okafor"), ("Tanaka", "tanaka"), ("Haddad", "haddad"), ("Lefèvre", "lefevre"),
    ("Jovanović", "jovanovic"),
)  # fmt: skip

CITIES: tuple[str, ...] = (
    "London", "Manchester", "Dublin", "Lisbon", "Porto", "Madrid", "Sevilla", "Lyon", "Köln", "München",
    "Kraków", "Göteborg", "Aarhus", "Zürich", "Wien", "Brno", "Málaga", "Cork", "Leeds", "Bristol",
)  # fmt: skip

STREETS: tuple[str, ...] = (
    "High Street", "Station Road", "Church Lane", "Rua Augusta", "Calle Mayor", "Rue de la Paix",
    "Hauptstraße", "Königsallee", "ul. Floriańska", "Storgatan", "Bahnhofstrasse", "Mill Lane",
)  # fmt: skip

PRODUCT_ADJECTIVES: tuple[str, ...] = (
    "Classic", "Organic", "Premium", "Everyday", "Family", "Crispy", "Fresh", "Smart", "Eco", "Deluxe",
)  # fmt: skip

PRODUCT_KINDS: tuple[tuple[str, str, str], ...] = (
    ("Sourdough", "bakery", "g"), ("Croissants", "bakery", "g"), ("Cola", "beverages", "ml"),
    ("Coffee Beans", "beverages", "g"), ("Sparkling Water", "beverages", "ml"), ("Yoghurt", "dairy", "g"),
    ("Cheddar", "dairy", "g"), ("Apples", "produce", "g"), ("Bananas", "produce", "g"),
    ("Pizza", "frozen", "g"), ("Ice Cream", "frozen", "ml"), ("Detergent", "household", "ml"),
    ("Sponges", "household", ""), ("Shampoo", "personal care", "ml"), ("Toothpaste", "personal care", "ml"),
    ("Crisps", "snacks", "g"), ("Cookies", "snacks", "g"), ("Earbuds", "electronics", ""),
    ("USB-C Cable", "electronics", ""), ("Notebook", "stationery", ""), ("Gel Pens", "stationery", ""),
)  # fmt: skip
"""(product noun, category, unit of its size: g, ml or '' for none)."""


# --- sizes ----------------------------------------------------------------------------------------


def scaled_counts(scale: float) -> dict[str, int]:
    """Rows per table for `scale` (at least 1 each, at least one employee per store). order_items is
    the expected average (3 per order); the exact count follows from the seed."""
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise RegalError(f"scale must be a positive number, not {scale!r}", "use e.g. 0.01, 1 or 20")
    counts = {table: max(1, math.ceil(base * scale)) for table, base in BASE_COUNTS.items()}
    counts["employees"] = max(counts["employees"], counts["stores"])
    counts["payments"] = counts["orders"]
    counts["order_items"] = 3 * counts["orders"]
    return {table: counts[table] for table in TABLES}


# --- deterministic pseudo-random values, as SQL expressions ---------------------------------------


def _column_seed(seed: int, column: str) -> int:
    """A 64-bit hash seed for one generated column, derived from the user's seed."""
    digest = hashlib.sha256(f"regal-datagen:{seed}:{column}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class _Random:
    """Builds SQL expressions for reproducible pseudo-random values keyed by a row number."""

    def __init__(self, seed: int):
        self.seed = seed

    def hash(self, key: str, column: str) -> str:
        """A non-negative 31-bit integer from row key `key` (an SQL expression) for `column`."""
        return f"(hashint8extended(({key})::int8, {_column_seed(self.seed, column)}) & 2147483647)"

    def pick(self, key: str, column: str, n: int | str) -> str:
        """An integer in [0, n)."""
        return f"(({self.hash(key, column)} % ({n}))::int4)"

    def uniform(self, key: str, column: str) -> str:
        """A float8 in [0, 1)."""
        return f"({self.hash(key, column)}::float8 / 2147483648.0)"

    def choice(self, key: str, column: str, options: tuple[str, ...]) -> str:
        """One of `options` (an SQL text array literal is built inline)."""
        return f"({_text_array(options)})[1 + {self.pick(key, column, len(options))}]"


def _text_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _text_array(values: tuple[str, ...] | list[str]) -> str:
    return "ARRAY[" + ", ".join(_text_literal(v) for v in values) + "]::text[]"


# --- the schema -----------------------------------------------------------------------------------

_CREATE = f"""
CREATE TABLE {SCHEMA}.stores (
    id integer GENERATED BY DEFAULT AS IDENTITY NOT NULL,
    name text NOT NULL,
    city text NOT NULL,
    address text NOT NULL,
    opened_on date NOT NULL
);
CREATE TABLE {SCHEMA}.employees (
    id integer GENERATED BY DEFAULT AS IDENTITY NOT NULL,
    store_id integer NOT NULL,
    full_name text NOT NULL,
    email text NOT NULL,
    role text NOT NULL,
    hired_on date NOT NULL
);
CREATE TABLE {SCHEMA}.customers (
    id integer GENERATED BY DEFAULT AS IDENTITY NOT NULL,
    full_name text NOT NULL,
    email text NOT NULL,
    phone text NOT NULL,
    address text NOT NULL,
    date_of_birth date NOT NULL,
    marketing_consent boolean NOT NULL,
    analytics_consent boolean NOT NULL,
    consent_updated_at timestamptz NOT NULL,
    loyalty_number text NOT NULL,
    created_at timestamptz NOT NULL
);
CREATE TABLE {SCHEMA}.products (
    id integer GENERATED BY DEFAULT AS IDENTITY NOT NULL,
    sku text NOT NULL,
    name text NOT NULL,
    price numeric(10,2) NOT NULL CHECK (price >= 0),
    category text NOT NULL
);
CREATE TABLE {SCHEMA}.orders (
    id bigint GENERATED BY DEFAULT AS IDENTITY NOT NULL,
    store_id integer NOT NULL,
    employee_id integer NOT NULL,
    customer_id integer NOT NULL,
    ordered_at timestamptz NOT NULL,
    receipt_no text NOT NULL,
    channel text NOT NULL,
    status text NOT NULL CHECK (status IN ('completed', 'refunded', 'cancelled', 'pending')),
    total numeric(12,2) NOT NULL
);
CREATE TABLE {SCHEMA}.order_items (
    id bigint GENERATED BY DEFAULT AS IDENTITY NOT NULL,
    order_id bigint NOT NULL,
    line_no smallint NOT NULL,
    product_id integer NOT NULL,
    quantity integer NOT NULL CHECK (quantity > 0),
    unit_price numeric(10,2) NOT NULL,
    discount numeric(10,2) NOT NULL DEFAULT 0
);
CREATE TABLE {SCHEMA}.payments (
    id bigint GENERATED BY DEFAULT AS IDENTITY NOT NULL,
    order_id bigint NOT NULL,
    method text NOT NULL CHECK (method IN ('card', 'mobile', 'cash', 'gift_card')),
    amount numeric(12,2) NOT NULL,
    card_token text,
    card_last4 char(4),
    card_brand text,
    auth_code text,
    terminal_id text NOT NULL,
    paid_at timestamptz NOT NULL
);
"""

_CONSTRAINTS = f"""
ALTER TABLE {SCHEMA}.stores ADD PRIMARY KEY (id);
ALTER TABLE {SCHEMA}.employees ADD PRIMARY KEY (id),
    ADD FOREIGN KEY (store_id) REFERENCES {SCHEMA}.stores (id);
ALTER TABLE {SCHEMA}.customers ADD PRIMARY KEY (id);
CREATE UNIQUE INDEX customers_email_key ON {SCHEMA}.customers (email);
ALTER TABLE {SCHEMA}.products ADD PRIMARY KEY (id), ADD UNIQUE (sku);
ALTER TABLE {SCHEMA}.orders ADD PRIMARY KEY (id),
    ADD FOREIGN KEY (store_id) REFERENCES {SCHEMA}.stores (id),
    ADD FOREIGN KEY (employee_id) REFERENCES {SCHEMA}.employees (id),
    ADD FOREIGN KEY (customer_id) REFERENCES {SCHEMA}.customers (id);
CREATE INDEX orders_customer_id_idx ON {SCHEMA}.orders (customer_id);
CREATE INDEX orders_ordered_at_idx ON {SCHEMA}.orders (ordered_at);
ALTER TABLE {SCHEMA}.order_items ADD PRIMARY KEY (id),
    ADD UNIQUE (order_id, line_no),
    ADD FOREIGN KEY (order_id) REFERENCES {SCHEMA}.orders (id) ON DELETE CASCADE,
    ADD FOREIGN KEY (product_id) REFERENCES {SCHEMA}.products (id);
ALTER TABLE {SCHEMA}.payments ADD PRIMARY KEY (id),
    ADD FOREIGN KEY (order_id) REFERENCES {SCHEMA}.orders (id) ON DELETE CASCADE;
CREATE INDEX payments_order_id_idx ON {SCHEMA}.payments (order_id);
"""


# --- the data -------------------------------------------------------------------------------------


def _name_parts(r: _Random, key: str, column: str) -> tuple[str, str]:
    """SQL for (display name, e-mail slug) of a person made of a random first and last name."""
    first = r.pick(key, f"{column}.first", len(FIRST_NAMES))
    last = r.pick(key, f"{column}.last", len(LAST_NAMES))
    first_names = _text_array([n for n, _ in FIRST_NAMES])
    first_slugs = _text_array([s for _, s in FIRST_NAMES])
    last_names = _text_array([n for n, _ in LAST_NAMES])
    last_slugs = _text_array([s for _, s in LAST_NAMES])
    display = f"(({first_names})[1 + {first}] || ' ' || ({last_names})[1 + {last}])"
    slug = f"(({first_slugs})[1 + {first}] || '.' || ({last_slugs})[1 + {last}])"
    return display, slug


def _address(r: _Random, key: str, column: str) -> str:
    """SQL for a street address: number, street, postcode and city."""
    return (
        f"((1 + {r.pick(key, column + '.no', 240)})::text || ' ' || {r.choice(key, column + '.street', STREETS)}"
        f" || ', ' || lpad((1000 + {r.pick(key, column + '.zip', 89000)})::text, 5, '0')"
        f" || ' ' || {r.choice(key, column + '.city', CITIES)})"
    )


def _statements(seed: int, counts: dict[str, int]) -> list[str]:
    """The INSERT ... SELECT statements that fill the tables, in dependency order."""
    r = _Random(seed)
    n_stores, n_employees = counts["stores"], counts["employees"]
    n_customers, n_products, n_orders = counts["customers"], counts["products"], counts["orders"]
    anchor = f"timestamptz {_text_literal(ANCHOR)}"
    emp_name, emp_slug = _name_parts(r, "i", "employee")
    cust_name, cust_slug = _name_parts(r, "i", "customer")
    special_names = _text_array([n for n, _ in SPECIAL_CUSTOMERS])
    special_slugs = _text_array([s for _, s in SPECIAL_CUSTOMERS])
    item_key = "o.o * 8 + l.line_no"
    kind_nouns = _text_array([noun for noun, _, _ in PRODUCT_KINDS])
    kind_categories = _text_array([category for _, category, _ in PRODUCT_KINDS])
    kind_units = _text_array([unit for _, _, unit in PRODUCT_KINDS])
    return [
        f"""
        INSERT INTO {SCHEMA}.stores (id, name, city, address, opened_on)
        SELECT i, 'Regal ' || c.city || ' #' || i, c.city, {_address(r, "i", "store")},
               date '2005-01-01' + {r.pick("i", "store.opened", 6000)}
        FROM generate_series(1, {n_stores}) AS i,
             LATERAL (SELECT {r.choice("i", "store.city", CITIES)} AS city) AS c
        """,
        f"""
        INSERT INTO {SCHEMA}.employees (id, store_id, full_name, email, role, hired_on)
        SELECT i, 1 + (i - 1) % {n_stores}, {emp_name}, {emp_slug} || '.' || i || '@staff.regal-pos.example',
               CASE WHEN {r.uniform("i", "employee.role")} < 0.75 THEN 'cashier'
                    WHEN {r.uniform("i", "employee.role")} < 0.93 THEN 'supervisor' ELSE 'manager' END,
               date '2010-01-01' + {r.pick("i", "employee.hired", 5000)}
        FROM generate_series(1, {n_employees}) AS i
        """,
        f"""
        INSERT INTO {SCHEMA}.customers (id, full_name, email, phone, address, date_of_birth,
                                        marketing_consent, analytics_consent, consent_updated_at,
                                        loyalty_number, created_at)
        SELECT i, coalesce(({special_names})[i], {cust_name}),
               coalesce(({special_slugs})[i], {cust_slug}) || '.' || i || '@'
                 || {r.choice("i", "customer.domain", ("example.com", "mail.example", "post.example.org"))},
               '+44 7' || lpad({r.pick("i", "customer.phone", 1_000_000_000)}::text, 9, '0'),
               {_address(r, "i", "customer")},
               date '1940-01-01' + {r.pick("i", "customer.dob", 365 * 65)},
               {r.uniform("i", "customer.marketing")} < 0.35,
               {r.uniform("i", "customer.analytics")} < 0.6,
               c.created_at + make_interval(secs => {r.pick("i", "customer.consent", 86400 * 300)}),
               'LOY' || lpad(i::text, 10, '0'),
               c.created_at
        FROM generate_series(1, {n_customers}) AS i,
             LATERAL (SELECT {anchor} - interval '6 years'
                             + make_interval(secs => {r.pick("i", "customer.created", 86400 * 365 * 4)})
                      AS created_at) AS c
        """,
        f"""
        INSERT INTO {SCHEMA}.products (id, sku, name, price, category)
        SELECT i, 'SKU-' || lpad(i::text, 6, '0'),
               {r.choice("i", "product.adj", PRODUCT_ADJECTIVES)} || ' ' || ({kind_nouns})[k.k]
                 || CASE WHEN ({kind_units})[k.k] = '' THEN ''
                         ELSE ' ' || (50 * (1 + {r.pick("i", "product.size", 20)})) || ({kind_units})[k.k] END,
               round((0.49 + 249.5 * power({r.uniform("i", "product.price")}, 3))::numeric, 2),
               ({kind_categories})[k.k]
        FROM generate_series(1, {n_products}) AS i,
             LATERAL (SELECT 1 + {r.pick("i", "product.kind", len(PRODUCT_KINDS))} AS k) AS k
        """,
        f"""
        INSERT INTO {SCHEMA}.order_items (id, order_id, line_no, product_id, quantity, unit_price, discount)
        SELECT row_number() OVER (ORDER BY o.o, l.line_no), o.o, l.line_no, p.id, q.quantity, p.price,
               CASE WHEN {r.uniform(item_key, "item.discount")} < 0.12
                    THEN round(p.price * q.quantity * 0.1, 2) ELSE 0 END
        FROM generate_series(1, {n_orders}) AS o,
             LATERAL generate_series(1, 1 + {r.pick("o.o", "order.lines", 5)}) AS l(line_no),
             LATERAL (SELECT 1 + {r.pick(item_key, "item.product", n_products)} AS id,
                             CASE WHEN {r.uniform(item_key, "item.qty")} < 0.7 THEN 1
                                  WHEN {r.uniform(item_key, "item.qty")} < 0.9 THEN 2
                                  ELSE 3 + {r.pick(item_key, "item.qty.bulk", 4)} END AS quantity) AS q
        JOIN {SCHEMA}.products AS p ON p.id = q.id
        ORDER BY o.o, l.line_no
        """,
        f"""
        INSERT INTO {SCHEMA}.orders (id, store_id, employee_id, customer_id, ordered_at, receipt_no, channel,
                                     status, total)
        SELECT s.o, s.store_id,
               s.store_id + {n_stores} * {r.pick("s.o", "order.employee",
                                                 f"({n_employees} - s.store_id) / {n_stores} + 1")},
               1 + {r.pick("s.o", "order.customer", n_customers)},
               date_trunc('day', {anchor}) - make_interval(days => {r.pick("s.o", "order.day", 730)})
                 + make_interval(secs => 8 * 3600 + {r.pick("s.o", "order.time", 13 * 3600)}),
               'R' || lpad(s.store_id::text, 4, '0') || '-' || lpad(s.o::text, 9, '0'),
               CASE WHEN {r.uniform("s.o", "order.channel")} < 0.85 THEN 'in_store'
                    WHEN {r.uniform("s.o", "order.channel")} < 0.95 THEN 'self_checkout'
                    ELSE 'click_collect' END,
               CASE WHEN {r.uniform("s.o", "order.status")} < 0.90 THEN 'completed'
                    WHEN {r.uniform("s.o", "order.status")} < 0.94 THEN 'refunded'
                    WHEN {r.uniform("s.o", "order.status")} < 0.97 THEN 'cancelled' ELSE 'pending' END,
               t.total
        FROM (SELECT o, 1 + {r.pick("o", "order.store", n_stores)} AS store_id
              FROM generate_series(1, {n_orders}) AS o) AS s
        JOIN (SELECT order_id, sum(quantity * unit_price - discount) AS total
              FROM {SCHEMA}.order_items GROUP BY order_id) AS t ON t.order_id = s.o
        ORDER BY s.o
        """,
        f"""
        INSERT INTO {SCHEMA}.payments (id, order_id, method, amount, card_token, card_last4, card_brand,
                                       auth_code, terminal_id, paid_at)
        SELECT x.id, x.id, x.method, x.total,
               CASE WHEN x.method IN ('card', 'mobile') THEN
                 'tok_' || lpad(to_hex(hashint8extended(x.id, {_column_seed(seed, "payment.tok1")})), 16, '0')
                        || lpad(to_hex(hashint8extended(x.id, {_column_seed(seed, "payment.tok2")})
                                       & 4294967295), 8, '0') END,
               CASE WHEN x.method IN ('card', 'mobile') THEN
                 lpad({r.pick("x.id", "payment.last4", 10000)}::text, 4, '0') END,
               CASE WHEN x.method IN ('card', 'mobile') THEN
                 {r.choice("x.id", "payment.brand",
                           ("visa", "visa", "visa", "mastercard", "mastercard", "amex", "discover"))} END,
               CASE WHEN x.method IN ('card', 'mobile') THEN
                 upper(lpad(to_hex({r.pick("x.id", "payment.auth", 16777216)}), 6, '0')) END,
               'T' || lpad(x.store_id::text, 4, '0') || '-' || lpad((1 + {r.pick("x.id", "payment.terminal",
                                                                                 6)})::text, 2, '0'),
               x.ordered_at + make_interval(secs => 5 + {r.pick("x.id", "payment.delay", 300)})
        FROM (SELECT o.id, o.total, o.ordered_at, o.store_id,
                     CASE WHEN {r.uniform("o.id", "payment.method")} < 0.62 THEN 'card'
                          WHEN {r.uniform("o.id", "payment.method")} < 0.80 THEN 'mobile'
                          WHEN {r.uniform("o.id", "payment.method")} < 0.95 THEN 'cash'
                          ELSE 'gift_card' END AS method
              FROM {SCHEMA}.orders AS o) AS x
        ORDER BY x.id
        """,
    ]


def _sync_identity_sequences() -> str:
    """SQL that moves each identity sequence past the generated ids (later inserts get fresh ids)."""
    return ";\n".join(
        f"SELECT setval(pg_get_serial_sequence('{SCHEMA}.{t}', 'id'), "
        f"(SELECT coalesce(max(id), 0) + 1 FROM {SCHEMA}.{t}), false)"
        for t in TABLES
    )


# --- the entry point ------------------------------------------------------------------------------


def existing_tables(conn: psycopg.Connection) -> list[str]:
    """Which of the generated tables already exist in the target database."""
    rows = conn.execute(
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relname = ANY(%s) AND c.relkind IN ('r', 'p')",
        (SCHEMA, list(TABLES)),
    ).fetchall()
    found = {row[0] for row in rows}
    return [t for t in TABLES if t in found]


def table_counts(conn: psycopg.Connection) -> dict[str, int]:
    """Exact row count of each generated table."""
    counts: dict[str, int] = {}
    for table in TABLES:
        row = conn.execute(f"SELECT count(*) FROM {SCHEMA}.{table}").fetchone()
        counts[table] = int(row[0]) if row else 0
    return counts


def create_pos_database(dsn: str, scale: float, seed: int = 42, replace: bool = False) -> dict[str, int]:
    """Create and fill the point-of-sale tables in the database at `dsn`; returns rows per table.

    Fails with RegalError when the tables exist already, unless `replace` drops them first. Everything
    happens in one transaction: on failure the database is left as it was.
    """
    counts = scaled_counts(scale)
    if not isinstance(seed, int):
        raise RegalError(f"seed must be an integer, not {seed!r}", "use e.g. --seed 42")
    try:
        conn = psycopg.connect(dsn, autocommit=True, connect_timeout=15)
    except psycopg.OperationalError as exc:
        raise RegalError(
            f"could not connect to the database to generate demo data: {exc}".strip(),
            "check that the server is running and the connection settings are right",
        ) from None
    with conn:
        try:
            _generate(conn, counts, seed, replace)
        except psycopg.Error as exc:
            raise RegalError(
                f"generating the demo data failed: {exc}".strip(),
                "nothing was kept (one transaction); check the server log and free disk space",
            ) from exc
        return table_counts(conn)


def _generate(conn: psycopg.Connection, counts: dict[str, int], seed: int, replace: bool) -> None:
    """Create, fill and constrain the tables in one transaction, then ANALYZE them."""
    with conn.transaction():
        _prepare_target(conn, replace)
        conn.execute("SET LOCAL maintenance_work_mem = '256MB'")
        conn.execute("SET LOCAL work_mem = '64MB'")
        conn.execute("SET LOCAL synchronous_commit = off")
        conn.execute(_CREATE)
        for statement in _statements(seed, counts):
            conn.execute(statement)
        conn.execute(_CONSTRAINTS)
        conn.execute(_sync_identity_sequences())
    for table in TABLES:
        conn.execute(f"ANALYZE {SCHEMA}.{table}")


def _prepare_target(conn: psycopg.Connection, replace: bool) -> None:
    """Refuse to overwrite existing tables, or drop them when `replace` is set."""
    found = existing_tables(conn)
    if not found:
        return
    if not replace:
        raise RegalError(
            f"the database already has point-of-sale tables ({', '.join(found)})",
            "use a fresh database, or pass replace=True (--replace) to drop and regenerate them",
        )
    conn.execute(f"DROP TABLE IF EXISTS {', '.join(f'{SCHEMA}.{t}' for t in reversed(TABLES))} CASCADE")
