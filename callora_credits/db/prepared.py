"""Hot statements compiled once per engine and sent on the transaction's own cursor.

Every balance read and every charge runs the same few statements. Through
``Connection.execute`` each one pays for SQLAlchemy's per-execution set-up
(cache look-up, parameter processing, result metadata), which costs more CPU
than the round trip to a local database. A :class:`PreparedStatement`
compiles its SQLAlchemy Core statement once per dialect and then runs the
same SQL text, with the same bind processing, on the DBAPI cursor of the
connection that holds the transaction. The transaction itself (begin,
commit, rollback, pool, retries) stays SQLAlchemy's.

When anything listens to the engine's execution events (query recording,
tracing, statement counting), the statement goes through
``Connection.execute`` instead, so listeners see every statement exactly as
they would otherwise. Database errors are wrapped the way SQLAlchemy wraps
them (``IntegrityError``, ``OperationalError``, …), and a lost connection
is invalidated, so callers and retries cannot tell the two paths apart.
"""

from __future__ import annotations

from collections import namedtuple
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from weakref import WeakKeyDictionary

from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql.expression import Executable

__all__ = ["PreparedStatement"]

# Execution events that see statements or their errors; any listener (on
# the engine, on the Engine class, or the dialect's handle_error) sends the
# statement through Connection.execute.
_STATEMENT_EVENTS = (
    "before_execute",
    "after_execute",
    "before_cursor_execute",
    "after_cursor_execute",
)

Processor = Callable[[Any], Any]


def _instrumented(conn: Connection) -> bool:
    # SQLAlchemy's own flags say quickly that nothing ever listened (the
    # usual case); once set they stay set, so then ask the dispatcher.
    if not (getattr(conn, "_has_events", True) or getattr(conn.engine, "_has_events", True)):
        return bool(conn.dialect.dispatch.handle_error)
    dispatch = conn.dispatch
    return bool(conn.dialect.dispatch.handle_error) or any(
        getattr(dispatch, name) for name in _STATEMENT_EVENTS
    )


class _Form:
    """One statement compiled for one dialect: SQL text and how to fill it."""

    def __init__(self, clause: Any, dialect: Dialect, column_keys: Sequence[str] | None) -> None:
        compiled = clause.compile(dialect=dialect, column_keys=column_keys)
        if (
            compiled.post_compile_params
            or compiled.literal_execute_params
            or compiled.insert_prefetch
            or compiled.update_prefetch
        ):
            # Parameters rendered or defaults computed per execution: only
            # Connection.execute knows how.
            raise ValueError("a prepared statement needs every value bound by the caller")
        self.sql: str = compiled.string
        # Keyed by the name rendered in the SQL text.
        binds = {name: bind for bind, name in compiled.bind_names.items()}
        # Constants the statement binds itself (a literal 0, 'pending').
        self.static: dict[str, Any] = {
            name: bind.effective_value for name, bind in binds.items() if not bind.required
        }
        self.required = tuple(name for name in binds if name not in self.static)
        self.processors: dict[str, Processor] = {}
        for name, bind in binds.items():
            processor = bind.type.dialect_impl(dialect).bind_processor(dialect)
            if processor is not None:
                self.processors[name] = processor
        self.positions: tuple[str, ...] | None = (
            tuple(compiled.positiontup) if compiled.positional else None
        )
        columns = list(getattr(clause, "exported_columns", ()))
        self.returns_rows = bool(columns)
        self.row_type: Any = None
        self.result_processors: list[Processor | None] = []
        if columns:
            self.row_type = namedtuple("Row", [column.key for column in columns])  # type: ignore[misc]
            self.result_processors = [
                column.type.dialect_impl(dialect).result_processor(dialect, None)
                for column in columns
            ]
            if not any(self.result_processors):
                self.result_processors = []

    def parameters(self, params: Mapping[str, Any]) -> Any:
        values = {**self.static, **params}
        for name in self.required:
            if name not in values:
                raise KeyError(f"missing bind parameter {name!r}")
        for name, processor in self.processors.items():
            values[name] = processor(values[name])
        if self.positions is None:
            return values
        return tuple(values[name] for name in self.positions)

    def row(self, raw: Sequence[Any]) -> Any:
        if self.result_processors:
            raw = [
                value if processor is None else processor(value)
                for processor, value in zip(self.result_processors, raw, strict=True)
            ]
        return self.row_type._make(raw)


class PreparedStatement:
    """A SQLAlchemy Core statement of the hot path, compiled once per dialect.

    ``column_keys`` fixes the columns of an ``insert()`` without ``values()``
    (as ``Connection.execute`` would infer them from the parameters).
    """

    def __init__(self, clause: Executable, column_keys: Sequence[str] | None = None) -> None:
        self.clause = clause
        self.column_keys = list(column_keys) if column_keys is not None else None
        self._forms: WeakKeyDictionary[Dialect, _Form] = WeakKeyDictionary()

    def sql(self, dialect: Dialect) -> str:
        """The SQL text sent on ``dialect`` (the same on both paths)."""
        return self._form(dialect).sql

    def _form(self, dialect: Dialect) -> _Form:
        form = self._forms.get(dialect)
        if form is None:
            form = self._forms[dialect] = _Form(self.clause, dialect, self.column_keys)
        return form

    def first(self, conn: Connection, params: Mapping[str, Any]) -> Any:
        """The first row (a named tuple), or ``None``."""
        form = self._form(conn.dialect)  # compiled (and checked) on both paths
        if _instrumented(conn):
            return conn.execute(self.clause, params).first()
        return self._run(conn, form, params, fetch=True)

    def rowcount(self, conn: Connection, params: Mapping[str, Any]) -> int:
        """Run the statement; the number of rows it matched."""
        form = self._form(conn.dialect)
        if _instrumented(conn):
            result = conn.execute(self.clause, params)
            return int(result.rowcount)
        return int(self._run(conn, form, params, fetch=False))

    def _run(
        self, conn: Connection, form: _Form, params: Mapping[str, Any], *, fetch: bool
    ) -> Any:
        values = form.parameters(params)
        dialect = conn.dialect
        dbapi_conn = conn.connection.dbapi_connection
        assert dbapi_conn is not None  # a live connection holds the transaction
        cursor = dbapi_conn.cursor()
        try:
            cursor.execute(form.sql, values)
            if not fetch:
                return cursor.rowcount
            raw = cursor.fetchone() if form.returns_rows else None
            return None if raw is None else form.row(raw)
        except dialect.loaded_dbapi.Error as error:
            invalidated = dialect.is_disconnect(error, dbapi_conn, cursor)
            wrapped = DBAPIError.instance(
                form.sql,
                values,
                error,
                dialect.loaded_dbapi.Error,
                connection_invalidated=invalidated,
                dialect=dialect,
            )
            if invalidated:
                conn.invalidate(wrapped)
            raise wrapped from error
        finally:
            cursor.close()
