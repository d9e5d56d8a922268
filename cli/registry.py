"""``tracelearn registry``: publish, list, show, diff, promote, roll back and search artifacts.

Every subcommand takes ``--registry LOCATION`` (default ``$TRACELEARN_REGISTRY`` or
``~/.cache/tracelearn/registry``; ``mlflow+http://host:port`` for an MLflow server). Registry errors
become one-line messages and exit status 1; nothing is left half-written.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import click

from tracelearn.registry import ArtifactVersion, Lineage, Registry, RegistryError, open_registry
from tracelearn.registry.artifacts import InvalidArtifactError, check_alias
from tracelearn.registry.backend import default_registry_location

P = ParamSpec("P")
R = TypeVar("R")


def registry_option(command: Callable[P, R]) -> Callable[P, R]:
    return click.option(
        "--registry", "location", default=None, metavar="LOCATION",
        help="Registry location (default: $TRACELEARN_REGISTRY or ~/.cache/tracelearn/registry).",
    )(command)


@contextmanager
def opened(location: str | None) -> Iterator[Registry]:
    try:
        yield open_registry(location)
    except RegistryError as error:
        raise click.ClickException(str(error)) from error


@click.group()
def registry() -> None:
    """Versioned prompts and checkpoints with aliases (production, candidate) and lineage."""


@registry.command()
@click.argument("kind", type=click.Choice(["prompt", "checkpoint"]))
@click.argument("name")
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.option("--lineage", "lineage_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="JSON file with the version's lineage (dataset, partitions, pipeline_config_hash, ...).")
@click.option("--metadata", "metadata_items", multiple=True, metavar="KEY=VALUE", help="Searchable metadata.")
@click.option("--alias", "aliases", multiple=True, help="Also point this alias at the version (repeatable).")
@click.option("--follow-links", is_flag=True,
              help="Copy the targets of links that leave SOURCE (default: refuse them, naming the link).")
@registry_option
def publish(kind: str, name: str, source: Path, lineage_file: Path | None, metadata_items: tuple[str, ...],
            aliases: tuple[str, ...], follow_links: bool, location: str | None) -> None:
    """Publish SOURCE (a prompt text file, or a checkpoint directory) as the next version of NAME.

    A link inside SOURCE is published as the file it names; a link that leaves SOURCE is refused
    unless --follow-links.
    """
    metadata = dict(_key_value(item, "--metadata") for item in metadata_items)
    with opened(location) as store:
        for alias in aliases:  # a bad alias fails before anything is published
            check_alias(alias)
        lineage = _read_lineage(lineage_file) if lineage_file else None
        published = store.publish("checkpoint" if kind == "checkpoint" else "prompt", name, source,
                                  lineage=lineage, metadata=metadata, follow_links=follow_links)
        version = published.version
        state = "published" if published.created else "identical content already published as"
        click.echo(f"{state} {version.ref} ({version.format}, {len(version.files)} files, "
                   f"{_size(version.size)}, sha256 {version.digest[:12]})")
        for alias in aliases:
            move = store.promote(name, version.version, alias, reason="set at publish")
            click.echo(f"{name}@{alias} -> {move.version}" + (f" (was {move.previous})" if move.previous else ""))


@registry.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@registry_option
def list_artifacts(as_json: bool, location: str | None) -> None:
    """Every artifact: kind, number of versions, aliases."""
    with opened(location) as store:
        rows: list[dict[str, Any]] = []
        for name in store.names():
            versions = store.versions(name)
            rows.append({"name": name, "kind": versions[0].kind if versions else None,
                         "versions": len(versions), "aliases": store.aliases(name)})
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo(f"the registry at {location or default_registry_location()} is empty")
        return
    for row in rows:
        aliases = ", ".join(f"{alias}={number}" for alias, number in sorted(row["aliases"].items()))
        click.echo(f"{row['name']:<32} {row['kind'] or '-':<10} {row['versions']:>4} versions   {aliases}")


@registry.command()
@click.argument("reference")
@click.option("--json", "as_json", is_flag=True, help="Print the version record as JSON.")
@registry_option
def show(reference: str, as_json: bool, location: str | None) -> None:
    """One version (NAME, NAME@ALIAS or NAME@N): files, lineage, metadata, and the aliases naming it."""
    with opened(location) as store:
        version = store.resolve(reference)
        holders = sorted(alias for alias, number in store.aliases(version.name).items() if number == version.version)
        if as_json:
            click.echo(json.dumps({**version.to_dict(), "aliases": holders}, indent=2))
            return
        click.echo(f"{version.ref}  {version.kind} ({version.format})  created {version.created_at}")
        click.echo(f"  aliases: {', '.join(holders) or '-'}")
        click.echo(f"  digest:  {version.digest}")
        click.echo(f"  files:   {len(version.files)} ({_size(version.size)})")
        for entry in version.files:
            click.echo(f"    {entry.path:<40} {_size(entry.size):>10}  {entry.sha256[:12]}")
        lineage = {key: value for key, value in version.lineage.to_dict().items() if value not in (None, [], {})}
        for key, value in lineage.items():
            click.echo(f"  {key}: {json.dumps(value) if isinstance(value, dict | list) else value}")
        for key, value in sorted(version.metadata.items()):
            click.echo(f"  metadata.{key}: {value}")
        if version.kind == "prompt":
            click.echo("  ---")
            click.echo(store.read_prompt(version.ref)[1])


@registry.command()
@click.argument("name")
@click.argument("old", type=int)
@click.argument("new", type=int)
@registry_option
def diff(name: str, old: int, new: int, location: str | None) -> None:
    """What changed between two versions: the text of a prompt, or the files, config and lineage of a checkpoint."""
    with opened(location) as store:
        before, after = store.version(name, old), store.version(name, new)
        lines: list[str] = []
        if before.kind == after.kind == "prompt":
            lines += _unified(store.read_prompt(before.ref)[1], store.read_prompt(after.ref)[1], before.ref, after.ref)
        else:
            lines += _files_diff(before, after)
            if any(entry.path == "config.json" for entry in before.files + after.files):
                lines += _unified(_file_text(store, before, "config.json"), _file_text(store, after, "config.json"),
                                  f"{before.ref}/config.json", f"{after.ref}/config.json")
        lines += _unified(json.dumps({"lineage": before.lineage.to_dict(), "metadata": dict(before.metadata)},
                                     indent=1, sort_keys=True),
                          json.dumps({"lineage": after.lineage.to_dict(), "metadata": dict(after.metadata)},
                                     indent=1, sort_keys=True), f"{before.ref} lineage", f"{after.ref} lineage")
    click.echo("\n".join(lines) if lines else f"{before.ref} and {after.ref} are identical")


@registry.command()
@click.argument("name")
@click.argument("version", type=int)
@click.option("--alias", required=True, help="The alias to move (production, candidate, ...).")
@click.option("--reason", default="", help="Recorded in the alias's audit log.")
@registry_option
def promote(name: str, version: int, alias: str, reason: str, location: str | None) -> None:
    """Point ALIAS of NAME at VERSION, atomically; the previous holder is recorded."""
    with opened(location) as store:
        move = store.promote(name, version, alias, reason=reason)
    click.echo(f"{name}@{alias} -> {move.version}" + (f" (was {move.previous})" if move.previous else " (new alias)"))


@registry.command()
@click.argument("name")
@click.option("--alias", required=True, help="The alias to move back.")
@click.option("--reason", default="", help="Recorded in the alias's audit log.")
@registry_option
def rollback(name: str, alias: str, reason: str, location: str | None) -> None:
    """Move ALIAS back to the version it named before its latest promotion."""
    with opened(location) as store:
        move = store.rollback(name, alias, reason=reason)
    click.echo(f"{name}@{alias} rolled back to {move.version} (was {move.previous})")


@registry.command()
@click.argument("name")
@click.option("--alias", default=None, help="Only this alias.")
@registry_option
def history(name: str, alias: str | None, location: str | None) -> None:
    """The audit log of NAME's aliases: every move, who made it, and why."""
    with opened(location) as store:
        moves = store.alias_moves(name, alias)
    for move in moves:
        kind = "rollback" if move.rollback else "promote"
        was = f"(was {move.previous})" if move.previous else "(new)"
        click.echo(f"{move.moved_at}  {move.alias:<12} {kind:<8} -> {move.version:<4} {was:<10} "
                   f"{move.actor}  {move.reason}")
    if not moves:
        click.echo(f"{name} has no alias moves yet")


@registry.command()
@click.argument("conditions", nargs=-1, metavar="KEY=VALUE...")
@click.option("--kind", type=click.Choice(["prompt", "checkpoint"]), default=None)
@click.option("--json", "as_json", is_flag=True, help="Print the matching version records as JSON.")
@registry_option
def search(conditions: tuple[str, ...], kind: str | None, as_json: bool, location: str | None) -> None:
    """Versions whose metadata or lineage match every KEY=VALUE (e.g. training_run_id=42, metrics.success=0.5)."""
    where = dict(_key_value(item, "condition") for item in conditions)
    with opened(location) as store:
        found = store.search(where, kind="prompt" if kind == "prompt" else "checkpoint" if kind else None)
    if as_json:
        click.echo(json.dumps([version.to_dict() for version in found], indent=2))
        return
    for version in found:
        click.echo(f"{version.ref:<40} {version.kind:<10} {version.created_at}")
    if not found:
        click.echo("no version matches")


def _key_value(item: str, what: str) -> tuple[str, str]:
    key, separator, value = item.partition("=")
    if not separator or not key:
        raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint=what)
    return key, value


def _read_lineage(path: Path) -> Lineage:
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise InvalidArtifactError(f"lineage file {path} is not readable JSON: {error}") from error
    return Lineage.from_dict(document, source=str(path))


def _file_text(store: Registry, version: ArtifactVersion, path: str) -> str:
    if not any(entry.path == path for entry in version.files):
        return ""
    return (store.local_path(version) / path).read_text(errors="replace")


def _files_diff(before: ArtifactVersion, after: ArtifactVersion) -> list[str]:
    old = {entry.path: entry for entry in before.files}
    new = {entry.path: entry for entry in after.files}
    lines = [f"files {before.ref} -> {after.ref}:"]
    for path in sorted(old.keys() | new.keys()):
        if path not in new:
            lines.append(f"  - {path} ({_size(old[path].size)})")
        elif path not in old:
            lines.append(f"  + {path} ({_size(new[path].size)})")
        elif old[path].sha256 != new[path].sha256:
            lines.append(f"  ~ {path} ({_size(old[path].size)} -> {_size(new[path].size)})")
    return lines if len(lines) > 1 else []


def _unified(before: str, after: str, old_label: str, new_label: str) -> list[str]:
    return [line.rstrip("\n") for line in difflib.unified_diff(
        before.splitlines(keepends=True), after.splitlines(keepends=True), old_label, new_label)]


def _size(size: int) -> str:
    value: float = size
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"
