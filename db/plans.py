"""The query plans of what a db call runs: its statements recorded as they execute, then
EXPLAINed on PostgreSQL (tests/db/test_query_plans.py, bench/bench_scale.py)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, event


@dataclass(frozen=True)
class Statement:
    sql: str
    parameters: Any


@contextmanager
def recorded(engine: Engine) -> Iterator[list[Statement]]:
    """The SELECT, UPDATE and DELETE statements run on `engine` inside the block (one row at
    a time, not executemany), in order."""
    seen: list[Statement] = []

    def listen(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any,
               executemany: bool) -> None:
        head = statement.lstrip()[:6].upper()
        if not executemany and head in ("SELECT", "UPDATE", "DELETE") \
                and "pg_advisory" not in statement:
            seen.append(Statement(statement, parameters))

    event.listen(engine, "before_cursor_execute", listen)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", listen)


def explain(engine: Engine, statement: Statement, *, analyze: bool = False) -> dict[str, Any]:
    """The statement's plan (EXPLAIN FORMAT JSON's top object). With `analyze` it runs, so
    only for a SELECT; an UPDATE's plan is read without running it."""
    options = "FORMAT JSON, ANALYZE, BUFFERS" if analyze else "FORMAT JSON"
    with engine.connect() as conn:
        result = conn.exec_driver_sql(f"EXPLAIN ({options}) {statement.sql}",
                                      statement.parameters).scalar_one()
        conn.rollback()
    return dict(result[0])


def nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every node of a plan, depth first."""
    stack = [plan.get("Plan", plan)]
    while stack:
        node = stack.pop()
        yield node
        stack.extend(reversed(node.get("Plans", [])))


def seq_scans(plan: dict[str, Any], tables: set[str]) -> list[str]:
    """The tables of `tables` the plan reads with a sequential scan."""
    return [n["Relation Name"] for n in nodes(plan)
            if n.get("Node Type") == "Seq Scan" and n.get("Relation Name") in tables]


def outline(plan: dict[str, Any]) -> str:
    """One line: each node (type, relation or index), and the time when analyzed."""
    parts = []
    for n in nodes(plan):
        where = n.get("Index Name") or n.get("Relation Name") or ""
        parts.append(f"{n['Node Type']}{f' {where}' if where else ''}")
    took = plan.get("Execution Time")
    return " > ".join(parts) + (f"  ({took:.2f} ms)" if took is not None else "")
