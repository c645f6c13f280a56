"""The tests' synchronous view of a database: arranging rows and asserting on them."""

from __future__ import annotations

from typing import Any

import pymysql

from worker.config import DatabaseURL


def connect(url: DatabaseURL, database: str | None = None) -> pymysql.connections.Connection[Any]:
    return pymysql.connect(
        host=url.host,
        port=url.port,
        user=url.user,
        password=url.password,
        database=database,
        autocommit=True,
        cursorclass=pymysql.cursors.DictCursor,
    )


class SQL:
    """Synchronous helper for arranging rows and asserting on them."""

    def __init__(self, url: DatabaseURL) -> None:
        self.url = url
        self._conn = connect(url, url.database)

    def rows(self, query: str, args: Any = None) -> list[dict[str, Any]]:
        with self._conn.cursor() as cur:
            cur.execute(query, args)
            return list(cur.fetchall())

    def value(self, query: str, args: Any = None) -> Any:
        rows = self.rows(query, args)
        return next(iter(rows[0].values())) if rows else None

    def execute(self, query: str, args: Any = None) -> int:
        with self._conn.cursor() as cur:
            return int(cur.execute(query, args))

    def states(self) -> dict[str, int]:
        return {
            r["estado"]: int(r["n"])
            for r in self.rows("SELECT estado, COUNT(*) AS n FROM cola_envios GROUP BY estado")
        }

    def add_session(self, name: str = "test-session") -> int:
        self.execute("INSERT INTO sesiones_envio (nombre) VALUES (%s)", (name,))
        return int(self.value("SELECT id FROM sesiones_envio WHERE nombre = %s", (name,)))

    def add_rows(
        self,
        session_id: int,
        count: int,
        *,
        start: int = 0,
        message: str = '{"type":"text","text":{"body":"hola"}}',
    ) -> list[str]:
        phones = [f"+5198{start + i:07d}" for i in range(count)]
        with self._conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO cola_envios (sesion_id, cliente_id, telefono, mensaje) VALUES (%s, %s, %s, %s)",
                [(session_id, start + i + 1, phone, message) for i, phone in enumerate(phones)],
            )
        return phones

    def close(self) -> None:
        self._conn.close()
