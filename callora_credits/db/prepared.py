"""Hot statements compiled once per engine and sent on the transaction's own cursor.

Every balance read and every charge runs the same few statements. Through
``Connection.execute`` each one pays for SQLAlchemy's per-execution set-up
(cache look-up, parameter processing, result metadata), which costs more CPU
than the round trip to a local database. A :class:`PreparedStatement`
compiles its SQLAlchemy Core statement once per dialect and then runs the
same SQL text, with the same bind and result processing, on the DBAPI cursor
of the connection that holds the transaction.

It does so only where ``Connection.execute`` would do nothing more than that
call. The statement goes through ``Connection.execute`` itself when:

- anything listens to the engine's execution events (``before_execute``,
  ``before_cursor_execute``, their ``after_`` pairs) or to the dialect's
  ``handle_error`` and ``do_execute``: query recorders, tracers, statement
  counters;
- the connection logs its statements (``echo``, ``SQLALCHEMY_ECHO``, or the
  ``sqlalchemy.engine`` logger at ``INFO`` when it was checked out);
- an execution option is in force, on the engine, the connection or the
  statement, other than ``preserve_rowcount``, ``compiled_cache`` and the
  options applied to the DBAPI connection itself (``isolation_level``,
  ``logging_token``, ``postgresql_readonly``, ...): ``schema_translate_map``,
  ``stream_results`` and any option a later SQLAlchemy adds take its path;
- the connection is not in an active transaction (SQLAlchemy then begins
  one, or refuses with its own error);
- the parameters are not exactly those the statement was compiled for, or
  their bind processing fails: SQLAlchemy then builds the statement for
  them, or raises its own ``StatementError``; nothing has been sent;
- the dialect runs code of its own around the cursor call (input sizes,
  buffered or server-side cursors, per-statement hooks).

Anything raised while the cursor is created, executes or fetches goes to the
connection's own error handling, the one ``Connection.execute`` uses: a
database error comes out as the same ``DBAPIError`` subclass showing the same
statement and parameters (hidden under ``hide_parameters``), a lost
connection is invalidated (and the pool's others replaced at their next
checkout), and an exit exception (``KeyboardInterrupt``, gevent's ``Timeout``,
``GreenletExit``: anything not an ``Exception``) invalidates the connection
rather than return it to the pool in an unknown state.
"""

from __future__ import annotations

from collections import namedtuple
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn
from weakref import WeakKeyDictionary

from sqlalchemy.engine import BindTyping, Connection, Dialect
from sqlalchemy.engine.default import DefaultDialect, DefaultExecutionContext
from sqlalchemy.sql.expression import Executable
from sqlalchemy.util import is_exit_exception

__all__ = ["PreparedStatement"]

# Execution events that see statements; any listener (on the engine, on the
# Engine class) sends the statement through Connection.execute.
_STATEMENT_EVENTS = (
    "before_execute",
    "after_execute",
    "before_cursor_execute",
    "after_cursor_execute",
)

# Execution options that change nothing the cursor call does. The dialect's
# connection characteristics are applied to the DBAPI connection itself.
_NEUTRAL_OPTIONS = frozenset({"preserve_rowcount", "compiled_cache"})

# The cursor call leans on the connection's own error handling; a SQLAlchemy
# without it gets every statement through Connection.execute.
_HANDLES_ERRORS = callable(getattr(Connection, "_handle_dbapi_exception", None))

Processor = Callable[[Any], Any]

# Marks a bind parameter whose value the caller gives.
_FROM_CALLER: Any = object()


def _plain(conn: Connection, neutral: frozenset[str]) -> bool:
    """Whether Connection.execute would do no more here than the cursor call."""
    try:
        if conn._echo:
            return False
        # SQLAlchemy's flags say quickly that nothing ever listened (the usual
        # case); once set they stay set, so then ask the dispatchers.
        if conn._has_events or conn.engine._has_events:
            dispatch = conn.dispatch
            if any(getattr(dispatch, name) for name in _STATEMENT_EVENTS):
                return False
        dialect = conn.dialect
        if dialect._has_events and (dialect.dispatch.handle_error or dialect.dispatch.do_execute):
            return False
        options = conn._execution_options
        if options and not neutral.issuperset(options):
            return False
        transaction = conn._transaction
        if transaction is None or not transaction.is_active:
            return False
        nested = conn._nested_transaction
        if nested is not None and not nested.is_active:
            return False
        context = conn._trans_context_manager
        if context is not None and not context._transaction_is_active():
            return False
        return conn._dbapi_connection is not None
    except AttributeError:  # a SQLAlchemy that keeps these elsewhere
        return False


def _only_cursor_execute(dialect: Dialect) -> bool:
    """Whether Connection.execute does no more on ``dialect`` than ``cursor.execute``.

    A dialect that sets input sizes, uses server-side or buffered cursors, or
    runs its own code around the call keeps every statement on its path.
    """
    context: Any = dialect.execution_ctx_cls
    plain_post_exec: list[Any] = [DefaultExecutionContext.post_exec]
    try:
        from sqlalchemy.dialects.mysql.base import MySQLExecutionContext

        # MariaDB's only completes DELETE ... RETURNING; no hot statement is a DELETE.
        plain_post_exec.append(MySQLExecutionContext.post_exec)
    except ImportError:  # pragma: no cover - SQLAlchemy ships it
        pass
    return (
        type(dialect).do_execute is DefaultDialect.do_execute
        and dialect.bind_typing is not BindTyping.SETINPUTSIZES
        and not getattr(dialect, "server_side_cursors", False)
        and context.create_cursor is DefaultExecutionContext.create_cursor
        and context.create_default_cursor is DefaultExecutionContext.create_default_cursor
        and context.pre_exec is DefaultExecutionContext.pre_exec
        and context.post_exec in plain_post_exec
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
        self.neutral = _NEUTRAL_OPTIONS | frozenset(
            getattr(dialect, "connection_characteristics", ())
        )
        # Escaped bind names are set up per execution by SQLAlchemy: such a
        # statement never takes the cursor call.
        self.direct = (
            _HANDLES_ERRORS
            and _only_cursor_execute(dialect)
            and not compiled.escaped_bind_names
            and self.neutral.issuperset(clause._execution_options)
        )
        # Keyed by the name rendered in the SQL text.
        binds = {name: bind for bind, name in compiled.bind_names.items()}
        # In SQLAlchemy's order (as errors show them): each name with the
        # constant the statement binds itself (a literal 0, 'pending'), or
        # _FROM_CALLER.
        self.slots: tuple[tuple[str, Any], ...] = tuple(
            (name, _FROM_CALLER if bind.required else bind.effective_value)
            for name, bind in binds.items()
        )
        # The parameters this SQL text is for. Connection.execute builds an
        # INSERT (and the SET of an UPDATE) from the keys it is given, so any
        # other set of keys is left to it.
        self.keys = frozenset(name for name, value in self.slots if value is _FROM_CALLER)
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
        values = {
            name: params[name] if value is _FROM_CALLER else value for name, value in self.slots
        }
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


# What _run returns when the statement must go through Connection.execute.
_THROUGH_EXECUTE: Any = object()


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
        if form.direct and params.keys() == form.keys and _plain(conn, form.neutral):
            row = self._run(conn, form, params, fetch=True)
            if row is not _THROUGH_EXECUTE:
                return row
        return conn.execute(self.clause, params).first()

    def all(self, conn: Connection, params: Mapping[str, Any]) -> list[Any]:
        """Every row (named tuples)."""
        form = self._form(conn.dialect)
        if form.direct and params.keys() == form.keys and _plain(conn, form.neutral):
            rows = self._run(conn, form, params, fetch=True, many=True)
            if rows is not _THROUGH_EXECUTE:
                return list(rows)
        return list(conn.execute(self.clause, params).all())

    def rowcount(self, conn: Connection, params: Mapping[str, Any]) -> int:
        """Run the statement; the number of rows it matched."""
        form = self._form(conn.dialect)
        if form.direct and params.keys() == form.keys and _plain(conn, form.neutral):
            count = self._run(conn, form, params, fetch=False)
            if count is not _THROUGH_EXECUTE:
                return int(count)
        return int(conn.execute(self.clause, params).rowcount)

    def _run(
        self,
        conn: Connection,
        form: _Form,
        params: Mapping[str, Any],
        *,
        fetch: bool,
        many: bool = False,
    ) -> Any:
        try:
            values = form.parameters(params)
        except BaseException as error:
            if is_exit_exception(error):
                _fail(conn, error, form.sql, [params], None)
            # Nothing was sent: Connection.execute raises its own error for
            # these parameters.
            return _THROUGH_EXECUTE
        fairy = conn._dbapi_connection
        assert fairy is not None  # checked by _plain
        try:
            cursor = fairy.cursor()
        except BaseException as error:
            _fail(conn, error, form.sql, [params], None)
        try:
            cursor.execute(form.sql, values)
        except BaseException as error:
            _fail(conn, error, form.sql, values, cursor, sent=True)
        raw: Any = None
        try:
            if fetch and many:
                raw = cursor.fetchall() if form.returns_rows else []
            elif fetch:
                raw = cursor.fetchone() if form.returns_rows else None
            else:
                count = cursor.rowcount
        except BaseException as error:
            # As a result's fetch reports it: without the statement.
            _fail(conn, error, None, None, cursor)
        cursor.close()
        if not fetch:
            return count
        if many:
            return [form.row(item) for item in raw]
        return None if raw is None else form.row(raw)


def _fail(
    conn: Connection,
    error: BaseException,
    statement: str | None,
    parameters: Any,
    cursor: Any,
    *,
    sent: bool = False,
) -> NoReturn:
    """Raise ``error`` as Connection.execute would, with the same side effects.

    Once the cursor has executed, Connection.execute wraps only the driver's
    own errors; passing no statement keeps any other exception unwrapped.
    """
    if sent and not isinstance(error, conn.dialect.loaded_dbapi.Error):
        statement = parameters = None
    conn._handle_dbapi_exception(error, statement, parameters, cursor, None)
