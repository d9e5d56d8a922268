"""Migrations that lift a table read from an older file to the current schema version.

A migration is a pure function ``pa.Table -> pa.Table`` registered for (table name, from version);
``migrate`` applies them in order until the current version, then conforms the result to the
current schema (columns added since then become nulls, column order follows the schema).
"""

from collections.abc import Callable

import pyarrow as pa
import pyarrow.compute as pc

from tracelearn.schemas.tables import TableSpec

Migration = Callable[[pa.Table], pa.Table]

# (table name, version the migration reads) -> function producing version + 1.
MIGRATIONS: dict[tuple[str, int], Migration] = {}
# The migrations that only add nullable columns, and which: a lazy scan reads such files as they are,
# the missing columns as nulls, so a dataset need not be rewritten when tracelearn is upgraded.
COLUMN_ADDING: dict[tuple[str, int], frozenset[str]] = {}


class SchemaVersionError(ValueError):
    """A file's schema version cannot be read by this tracelearn."""


def register_migration(
    table: str, from_version: int, *, only_adds: tuple[str, ...] = ()
) -> Callable[[Migration], Migration]:
    """Decorator registering ``fn`` as the migration of ``table`` from ``from_version``.

    ``only_adds``: the nullable columns the new version adds, when that is all it changes (the migration
    returns its input), so a lazy scan can read files of the old version as they are.
    """

    def register(fn: Migration) -> Migration:
        MIGRATIONS[(table, from_version)] = fn
        if only_adds:
            COLUMN_ADDING[(table, from_version)] = frozenset(only_adds)
        return fn

    return register


def columns_added_since(spec: TableSpec, version: int) -> frozenset[str] | None:
    """The columns added after ``version`` when files of it read as ``spec``'s current version with those
    columns as nulls (every step since only added columns); ``None`` when they do not."""
    added: frozenset[str] = frozenset()
    for step in range(version, spec.version):
        columns = COLUMN_ADDING.get((spec.name, step))
        if columns is None:
            return None
        added |= columns
    return added


def conform(table: pa.Table, spec: TableSpec) -> pa.Table:
    """Select the spec's columns in order, adding missing nullable ones as nulls and casting types."""
    columns = []
    for field in spec.schema:
        if field.name in table.column_names:
            columns.append(table.column(field.name).cast(field.type))
        elif field.nullable:
            columns.append(pa.nulls(table.num_rows, field.type))
        else:
            raise SchemaVersionError(
                f"table {spec.name!r} lacks required column {field.name!r} and no migration adds it"
            )
    return pa.Table.from_arrays(columns, schema=spec.schema_with_metadata())


def migrate(table: pa.Table, spec: TableSpec, version: int, source: str) -> pa.Table:
    """Lift ``table`` (read at ``version`` from ``source``) to ``spec.version``."""
    if version > spec.version:
        raise SchemaVersionError(
            f"{source}: {spec.name} schema version {version} is newer than this tracelearn reads "
            f"({spec.version}); upgrade tracelearn"
        )
    while version < spec.version:
        step = MIGRATIONS.get((spec.name, version))
        if step is None:
            raise SchemaVersionError(
                f"{source}: no migration for {spec.name} from schema version {version} (current is {spec.version})"
            )
        table = step(table)
        version += 1
    return conform(table, spec)


@register_migration("rollouts", 1)
def _rollouts_v1_identity(table: pa.Table) -> pa.Table:
    """rollouts v1 -> v2: adds ``identity`` and ``error_message``.

    v1 built two kinds of rollout only: one trace (its id is the rollout id) or an explicit id;
    ``error_message`` was not kept (null).
    """
    trace_ids = table.column("trace_ids")
    one_trace = pc.and_(
        pc.equal(pc.list_value_length(trace_ids), 1),
        pc.equal(pc.binary_join(trace_ids, ""), table.column("rollout_id")),
    )
    identity = pc.if_else(pc.fill_null(one_trace, False), "trace", "explicit")
    return table.append_column("identity", identity).append_column(
        "error_message", pa.nulls(table.num_rows, pa.string())
    )


@register_migration(
    "spans", 1, only_adds=("request_temperature", "request_top_p", "request_top_k", "messages_problem")
)
def spans_v1_to_v2(table: pa.Table) -> pa.Table:
    """Version 2 adds the sampling parameters (request_temperature, request_top_p, request_top_k) and
    messages_problem; files written before know none of them, so they are null (``conform`` adds them)."""
    return table


@register_migration("spans", 2, only_adds=("model_version",))
def spans_v2_to_v3(table: pa.Table) -> pa.Table:
    """Version 3 adds ``model_version`` (which weights answered an LLM call); files written before did not
    keep it, so it is null (``conform`` adds it)."""
    return table


@register_migration("transitions", 1, only_adds=("temperature", "top_p", "top_k", "model_version"))
def transitions_v1_to_v2(table: pa.Table) -> pa.Table:
    """Version 2 adds the sampling parameters (``temperature``, ``top_p``, ``top_k``) and ``model_version`` of
    each call; files written before know none of them, so they are null: the trainer treats such rows as
    sampled at temperature 1 by the version it starts from, and counts them as unknown."""
    return table
