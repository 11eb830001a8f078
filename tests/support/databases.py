"""PostgreSQL databases for tests: migrated once, cloned a few times, reused after a reset.

``CREATE DATABASE ... TEMPLATE`` and ``DROP DATABASE`` each wait for a checkpoint's
fsyncs: about 1 to 2.5 s of wall clock per test on the 2-core machine, most of the
suite's waiting. A :class:`PgPool` instead keeps the clones of one session (one pool per
pytest-xdist worker) and, when a test ends:

1. terminates the connections the test left (a killed worker process, an undisposed
   engine), as ``DROP DATABASE ... WITH (FORCE)`` did;
2. compares the schema with the template's (tables, columns, indexes, constraints,
   sequences, triggers, functions, types, extensions and the Alembic revision): a test
   that migrated down, altered or added anything gets its database dropped, never reused;
3. deletes every row and restarts every sequence, so the next test starts from exactly
   what a fresh clone holds (an empty, migrated schema; ids from 1).

Each test still has a real database of its own for as long as it runs, with as many
connections and processes as it likes; only the clone is recycled. The clones commit
with ``synchronous_commit = off``: the server acknowledges a commit before its WAL
reaches the disk (about 0.25 ms instead of 3 ms here). Visibility, locking and
isolation are unchanged; only a crash of the PostgreSQL server itself could lose the
last commits, and no test crashes the server.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
from psycopg import sql

#: One digest of everything in a database's schema that a migration or a test could
#: change (a fresh clone and a reset one must give the same).
_SCHEMA_DIGEST = """
WITH ns AS (
    SELECT oid FROM pg_namespace
    WHERE nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')
      AND nspname NOT LIKE 'pg_temp_%' AND nspname NOT LIKE 'pg_toast_temp_%'
)
SELECT md5(coalesce(string_agg(item, E'\\n' ORDER BY item), '')) FROM (
    SELECT 'n:' || nspname FROM pg_namespace WHERE oid IN (SELECT oid FROM ns)
    UNION ALL
    SELECT 'r:' || c.oid::regclass::text || ':' || c.relkind::text
    FROM pg_class c WHERE c.relnamespace IN (SELECT oid FROM ns)
    UNION ALL
    SELECT 'a:' || a.attrelid::regclass::text || ':' || a.attnum || ':' || a.attname || ':'
        || format_type(a.atttypid, a.atttypmod) || ':' || a.attnotnull || ':'
        || a.attidentity::text || ':' || coalesce(pg_get_expr(d.adbin, d.adrelid), '')
    FROM pg_attribute a
    JOIN pg_class c ON c.oid = a.attrelid
    LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
    WHERE c.relnamespace IN (SELECT oid FROM ns) AND a.attnum > 0 AND NOT a.attisdropped
    UNION ALL
    SELECT 'i:' || pg_get_indexdef(i.indexrelid)
    FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
    WHERE c.relnamespace IN (SELECT oid FROM ns)
    UNION ALL
    SELECT 'k:' || conrelid::regclass::text || ':' || conname || ':' || pg_get_constraintdef(oid)
    FROM pg_constraint WHERE connamespace IN (SELECT oid FROM ns)
    UNION ALL
    SELECT 's:' || seqrelid::regclass::text || ':' || seqstart || ':' || seqincrement
    FROM pg_sequence
    UNION ALL
    SELECT 't:' || tgrelid::regclass::text || ':' || tgname
    FROM pg_trigger WHERE NOT tgisinternal
    UNION ALL
    SELECT 'p:' || oid::regprocedure::text FROM pg_proc WHERE pronamespace IN (SELECT oid FROM ns)
    UNION ALL
    SELECT 'y:' || oid::regtype::text FROM pg_type
    WHERE typnamespace IN (SELECT oid FROM ns) AND typrelid = 0
    UNION ALL
    SELECT 'e:' || enumtypid::regtype::text || ':' || enumsortorder || ':' || enumlabel
    FROM pg_enum
    UNION ALL
    SELECT 'x:' || extname || ':' || extversion FROM pg_extension
) AS schema(item)
"""

#: Tables with rows to delete: every table but Alembic's, children before parents.
_TABLES = """
SELECT c.oid, c.oid::regclass::text FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND c.relname <> 'alembic_version'
"""
_FOREIGN_KEYS = "SELECT conrelid, confrelid FROM pg_constraint WHERE contype = 'f'"

#: The ``application_name`` of the pool's own connections.
APPLICATION_NAME = "fgw-test-pool"


class PgPool:
    """Clones of a migrated template database, handed to one test at a time.

    Args:
        admin_url: a libpq URL of the server's maintenance database (``postgres``).
        template: the migrated template database's name.
    """

    def __init__(self, admin_url: str, template: str) -> None:
        self.admin_url = admin_url
        self.template = template
        self.prefix = f"fgw_t_{os.getpid()}_"
        self._free: list[str] = []
        self._all: set[str] = set()
        self._admin_conn: psycopg.Connection[Any] | None = None
        self._digest = self._schema_digest(template)
        self.created = 0  # clones made
        self.reset = 0  # clones reset after a test, for the next one
        self.discarded = 0  # clones dropped after a test (schema changed, reset failed)

    # ------------------------------------------------------------------ public

    @contextlib.contextmanager
    def database(self) -> Iterator[str]:
        """A database of the caller's own while the block runs (its name).

        A clone that cannot be reset to a fresh clone's state is dropped, not reused.
        """
        name = self._take()
        try:
            yield name
        finally:
            self._release(name)

    def close(self) -> None:
        """Drop every clone."""
        for name in sorted(self._all):
            self._drop(name)
        self._free.clear()
        if self._admin_conn is not None:
            self._admin_conn.close()

    # ------------------------------------------------------------------ internals

    def url(self, dbname: str) -> str:
        """The libpq URL of ``dbname`` on the same server."""
        return self.admin_url.rsplit("/", 1)[0] + "/" + dbname

    def _admin(self, statement: sql.Composable | str, params: tuple[Any, ...] = ()) -> Any:
        """Run one statement on the maintenance database (one connection, made again if
        a test cut it); its first column of the first row, if any."""
        for attempt in (1, 2):
            if self._admin_conn is None or self._admin_conn.closed:
                self._admin_conn = psycopg.connect(
                    self.admin_url, autocommit=True, application_name=APPLICATION_NAME
                )
            try:
                cursor = self._admin_conn.execute(statement, params)
            except psycopg.OperationalError:
                self._admin_conn.close()
                if attempt == 2:
                    raise
                continue
            row = cursor.fetchone() if cursor.description else None
            return row[0] if row else None
        return None

    def _connections(self, name: str) -> int:
        """Connections to ``name`` other than the pool's own (its resets)."""
        return int(
            self._admin(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = %s "
                "AND application_name <> %s",
                (name, APPLICATION_NAME),
            )
        )

    def _take(self) -> str:
        """A reset clone nobody is connected to, or a new clone.

        A connection to a reset clone would be a process a test left running, which could
        write into the next test's database: that clone is dropped instead (after half a
        second, in case it is a backend still on its way out).
        """
        while self._free:
            name = self._free.pop()
            deadline = time.monotonic() + 0.5
            while self._connections(name) and time.monotonic() < deadline:
                time.sleep(0.01)
            if not self._connections(name):
                return name
            self.discarded += 1
            self._drop(name)
        return self._create()

    def _create(self) -> str:
        name = f"{self.prefix}{uuid.uuid4().hex[:8]}"
        self._admin(
            sql.SQL("CREATE DATABASE {} TEMPLATE {} STRATEGY FILE_COPY").format(
                sql.Identifier(name), sql.Identifier(self.template)
            )
        )
        self._admin(
            sql.SQL("ALTER DATABASE {} SET synchronous_commit = off").format(sql.Identifier(name))
        )
        self._all.add(name)
        self.created += 1
        return name

    def _drop(self, name: str) -> None:
        self._admin(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        self._all.discard(name)

    def _schema_digest(self, dbname: str) -> str:
        with psycopg.connect(
            self.url(dbname), autocommit=True, application_name=APPLICATION_NAME
        ) as conn:
            return self._digest_of(conn)

    @staticmethod
    def _digest_of(conn: psycopg.Connection[Any]) -> str:
        row = conn.execute(_SCHEMA_DIGEST).fetchone()
        version = conn.execute("SELECT version_num FROM alembic_version").fetchall()
        assert row is not None
        return f"{row[0]}:{sorted(v for (v,) in version)}"

    def _release(self, name: str) -> None:
        try:
            self._admin(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            )
            with psycopg.connect(self.url(name), application_name=APPLICATION_NAME) as conn:
                if self._digest_of(conn) == self._digest:
                    _reset(conn)
                    conn.commit()
                    self._free.append(name)
                    self.reset += 1
                    return
        except psycopg.Error:
            pass  # whatever state it is in, it is dropped below
        self.discarded += 1
        self._drop(name)


def _reset(conn: psycopg.Connection[Any]) -> None:
    """Delete every row (children first) and restart every sequence."""
    tables = dict(conn.execute(_TABLES).fetchall())
    edges = conn.execute(_FOREIGN_KEYS).fetchall()
    for oid in children_first(list(tables), edges):
        conn.execute(sql.SQL("DELETE FROM {}").format(sql.SQL(tables[oid])))
    conn.execute("SELECT setval(seqrelid, seqstart, false) FROM pg_sequence")


def children_first(tables: list[int], edges: list[tuple[int, int]]) -> list[int]:
    """``tables`` ordered so that each table comes before the tables it references
    (a self-reference or a cycle is deleted in one go by the first DELETE that meets it:
    the foreign keys are checked at the end of each statement)."""
    parents: dict[int, set[int]] = {t: set() for t in tables}
    for child, parent in edges:
        if child in parents and parent in parents and child != parent:
            parents[child].add(parent)
    referenced_by: dict[int, set[int]] = {t: set() for t in tables}
    for child, ps in parents.items():
        for parent in ps:
            referenced_by[parent].add(child)
    order: list[int] = []
    done: set[int] = set()

    def visit(table: int, path: set[int]) -> None:
        if table in done or table in path:
            return
        path.add(table)
        for child in sorted(referenced_by[table]):
            visit(child, path)
        path.discard(table)
        done.add(table)
        order.append(table)

    for table in sorted(tables):
        visit(table, set())
    return order
