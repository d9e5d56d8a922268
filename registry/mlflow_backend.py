"""The registry on an MLflow tracking server: prompts in its prompt registry, checkpoints as registered models.

What lives where on the server (``MlflowRegistry(tracking_uri)``, or ``open_registry("mlflow+http://host:port")``):

- a **prompt** version is an MLflow prompt version (``register_prompt``); its text is the template;
- a **checkpoint** version is a registered-model version whose source is the ``files/`` artifact folder
  of a run in the experiment ``tracelearn-registry`` (one run per published version);
- our version numbers are MLflow's version numbers; kind, format, digest, created time, manifest
  (files with SHA-256), lineage and metadata are version tags (``tracelearn.*``, written and read back
  by ``mlflow_tags``: the long JSON ones split into 4,000-character chunks, to stay under MLflow's tag
  value limits on every database);
- the **alias audit log** is the params of one run per artifact (``alias-log/NAME`` in the same
  experiment, pointed to by the registered-model tag ``tracelearn.alias_log_run``): one param per move,
  key ``alias/ALIAS/SEQUENCE``, value the move as JSON. MLflow params are write-once (changing a
  param's value is refused, and the database's primary key settles two concurrent inserts), so a
  sequence number is claimed atomically: the loser gets ``AliasConflictError``. After the move is
  logged the MLflow alias itself is set, so MLflow's UI and clients (``models:/NAME@production``,
  ``prompts:/NAME@production``) see it; the log is authoritative, the MLflow alias is its mirror (a
process killed between the two leaves MLflow's alias one move behind until the next move).

A ``message`` metadata key, when given, is also the MLflow version's description (commit message).
Only registered models and prompts carrying the tag ``tracelearn.kind`` are ours; versions without a
``tracelearn.digest`` tag (registered by hand in MLflow) are not listed.

Downloads are cached by content digest under ``$TRACELEARN_REGISTRY_CACHE`` (default
``~/.cache/tracelearn/registry-cache``, shared with the object-storage backend), written to a
temporary folder and renamed into place, and checked on every ``local_path(verify=True)`` (``contents.verify_stored``:
the manifest against the digest, nothing added, every file re-hashed).

``mlflow`` (the ``mlflow-skinny`` client is enough: ``pip install tracelearn[mlflow]``) is imported
when a registry is opened, never at import time of ``tracelearn.registry``.
"""

from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tracelearn.registry.artifacts import (
    PROMPT_FILE,
    AliasConflictError,
    AliasMove,
    ArtifactKind,
    ArtifactNotFoundError,
    ArtifactVersion,
    InvalidArtifactError,
    Lineage,
    Published,
    RegistryError,
    check_name,
    manifest_digest,
)
from tracelearn.registry.backend import REGISTRY_CACHE_ENV, Registry, registry_cache_dir, utc_now
from tracelearn.registry.contents import SourceContents, verify_stored
from tracelearn.registry.mlflow_tags import (
    PROMPT_MARKER_TAG,
    TAG_ALIAS_LOG_FOR,
    TAG_ALIAS_LOG_RUN,
    TAG_DIGEST,
    TAG_KIND,
    artifact_kind,
    move_key,
    version_from_tags,
    version_tags,
)

EXPERIMENT_NAME = "tracelearn-registry"
FILES_FOLDER = "files"  # a checkpoint run's artifact folder holding the version's files

PARAM_VALUE_LIMIT = 6000  # MLflow's MAX_PARAM_VAL_LENGTH: one alias move must fit in one param
HEALTH_TIMEOUT_SECONDS = 5.0


def _mlflow_client_class() -> Any:
    try:
        from mlflow import MlflowClient
    except ImportError as error:
        raise RegistryError(
            f"the MLflow registry backend needs the mlflow client ({error}): pip install tracelearn[mlflow]"
        ) from error
    return MlflowClient


class MlflowRegistry(Registry):
    """Prompts and checkpoints on the MLflow tracking server at ``tracking_uri`` (``http://host:5000``)."""

    def __init__(self, tracking_uri: str, *, cache_dir: Path | None = None) -> None:
        client_class = _mlflow_client_class()
        self.tracking_uri = tracking_uri.rstrip("/")
        self.location = f"mlflow+{self.tracking_uri}"
        self.cache_dir = Path(cache_dir) if cache_dir is not None else registry_cache_dir()
        self._check_reachable()
        self._client: Any = client_class(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
        self._experiment_id: str | None = None
        # A name's kind and its alias log run never change once set: remembering them saves requests
        # (each costs tens of milliseconds on a loopback server, more over a network).
        self._kinds: dict[str, ArtifactKind] = {}
        self._alias_log_runs: dict[str, str] = {}

    # ---- primitives -------------------------------------------------------------------------------

    def names(self) -> list[str]:
        found: set[str] = set()
        with self._translated("listing artifacts"):
            for model in _all_pages(lambda token: self._client.search_registered_models(
                    filter_string=f"tags.`{TAG_KIND}` = 'checkpoint'", page_token=token)):
                found.add(model.name)
            for prompt in _all_pages(lambda token: self._client.search_prompts(
                    filter_string=f"tags.`{TAG_KIND}` = 'prompt'", page_token=token)):
                found.add(prompt.name)
        return sorted(found)

    def versions(self, name: str) -> list[ArtifactVersion]:
        kind = self._kind(name)
        found = [self._to_version(name, kind, model_version) for model_version in self._model_versions(name, kind)]
        return sorted((v for v in found if v is not None), key=lambda version: version.version)

    def alias_moves(self, name: str, alias: str | None = None) -> list[AliasMove]:
        _, run_id = self._alias_log_run(name, create=False)  # an unknown name is an error, not an empty log
        if run_id is None:
            return []
        moves = [move for move, _ in self._logged_moves(run_id).values()]
        if alias is not None:
            # One alias's order is its sequence, not the movers' clocks (they may be skewed).
            return sorted((move for move in moves if move.alias == alias), key=lambda move: move.sequence)
        return sorted(moves, key=lambda move: (move.moved_at, move.alias, move.sequence))

    def local_path(self, version: ArtifactVersion, verify: bool = True) -> Path:
        target = self.cache_dir / version.digest
        if target.is_dir():
            if verify:
                verify_stored(target, version, f"{version.ref} (cached at {target})")
            return target
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise RegistryError(f"cannot create the download cache {self.cache_dir} for {version.ref}: {error}; "
                                f"set ${REGISTRY_CACHE_ENV} to a writable folder") from error
        staging = self.cache_dir / f".{version.digest}.{uuid.uuid4().hex}.partial"
        try:
            files = staging / FILES_FOLDER
            files.mkdir(parents=True)
            if version.kind == "prompt":
                with self._translated(f"reading prompt {version.ref}"):
                    prompt = self._client.get_prompt_version(version.name, version.version)
                if prompt is None:
                    raise ArtifactNotFoundError(f"{version.ref} is gone from MLflow at {self.tracking_uri}")
                (files / PROMPT_FILE).write_bytes(str(prompt.template).encode("utf-8"))
            else:
                run_id = self._checkpoint_run_id(version)
                with self._translated(f"downloading {version.ref}"):
                    self._client.download_artifacts(run_id, FILES_FOLDER, str(staging))
            # Freshly downloaded files are always checked: the server's copy may be the corrupted one.
            verify_stored(files, version, f"{version.ref} (downloaded from {self.tracking_uri})")
            try:
                files.rename(target)
            except OSError:
                if not target.is_dir():  # another process renamed the same digest into place first: fine
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return target

    def _store_version(self, kind: ArtifactKind, name: str, contents: SourceContents, lineage: Lineage,
                       metadata: Mapping[str, str]) -> Published:
        digest = manifest_digest(contents.files)
        try:
            known = self._kind(name)
        except ArtifactNotFoundError:
            known = None
        if known is not None:
            existing = self._version_with_digest(name, kind, digest)
            if existing is not None:
                return Published(existing, created=False)
        tags = version_tags(kind, contents.format, digest, utc_now(), contents.files, lineage, metadata)
        message = metadata.get("message") or f"published by tracelearn (digest {digest[:12]})"
        if kind == "prompt":
            text = contents.sources[PROMPT_FILE].read_bytes().decode("utf-8")
            with self._translated(f"registering prompt {name}"):
                registered = self._client.register_prompt(name=name, template=text, commit_message=message,
                                                          tags=tags)
        else:
            registered = self._register_checkpoint(name, contents, tags, message)
        self._kinds[name] = kind
        version = self._to_version(name, kind, registered)
        assert version is not None  # it carries the digest tag just written
        return Published(version, created=True)

    def _append_alias_move(self, move: AliasMove) -> AliasMove:
        kind, run_id = self._alias_log_run(move.name, create=True)
        assert run_id is not None
        key = move_key(move.alias, move.sequence)
        # The writer token makes two otherwise identical moves different values: MLflow accepts
        # re-logging an identical param value, and then both writers would believe they won.
        token = uuid.uuid4().hex
        value = json.dumps({**move.to_dict(), "writer": token}, sort_keys=True)
        if len(value) > PARAM_VALUE_LIMIT:
            raise RegistryError(f"the audit entry of {move.name}@{move.alias} is {len(value)} characters, MLflow "
                                f"params hold {PARAM_VALUE_LIMIT}: shorten the reason ({len(move.reason)} characters)")
        try:
            with self._translated(f"recording the move of {move.name}@{move.alias}"):
                self._client.log_param(run_id, key, value)
        except RegistryError:
            landed = self._logged_moves(run_id).get(key)
            if landed is not None and landed[1] != token:
                raise self._conflict(move, landed[0]) from None
            raise
        # Accepted: the param now holds our value (with our token no other writer's value is equal).
        self._mirror_alias(move, kind)
        return move

    # ---- MLflow specifics -------------------------------------------------------------------------

    def _register_checkpoint(self, name: str, contents: SourceContents, tags: dict[str, str], message: str) -> Any:
        with self._translated(f"registering checkpoint {name}"):
            try:
                self._client.create_registered_model(name, tags={TAG_KIND: "checkpoint"},
                                                     description="checkpoints published by tracelearn")
            except Exception as error:
                if _error_code(error) != "RESOURCE_ALREADY_EXISTS":
                    raise
            run = self._client.create_run(self._experiment(), run_name=f"publish/{name}",
                                          tags={"tracelearn.artifact": name, TAG_DIGEST: tags[TAG_DIGEST]})
            run_id = run.info.run_id
            try:
                for stored, on_disk in sorted(contents.sources.items()):
                    folder = "/".join([FILES_FOLDER, *stored.split("/")[:-1]])
                    self._client.log_artifact(run_id, str(on_disk), artifact_path=folder)
            except BaseException:
                self._client.set_terminated(run_id, status="FAILED")
                raise
            self._client.set_terminated(run_id)
            model_version = self._client.create_model_version(
                name, source=f"{run.info.artifact_uri}/{FILES_FOLDER}", run_id=run_id,
                tags={**tags, "tracelearn.run_id": run_id}, description=message)
        return model_version

    def _kind(self, name: str) -> ArtifactKind:
        known = self._kinds.get(name)
        return known if known is not None else self._artifact_tags(name)[0]

    def _artifact_tags(self, name: str) -> tuple[ArtifactKind, dict[str, str]]:
        """The kind of ``name`` and the tags of its registered model or prompt."""
        check_name(name)
        with self._translated(f"reading {name}"):
            # The server hides prompts from registered-model lookups, and models from prompt lookups.
            tags: dict[str, str] | None = None
            if self._kinds.get(name) != "prompt":
                try:
                    tags = dict(self._client.get_registered_model(name).tags)
                except Exception as error:
                    if _error_code(error) != "RESOURCE_DOES_NOT_EXIST":
                        raise
            if tags is None:
                prompt = self._client.get_prompt(name)
                if prompt is None:
                    raise ArtifactNotFoundError(
                        f"no artifact named {name!r} in the MLflow registry at {self.tracking_uri} "
                        f"({_listing(self.names())}); publish it first"
                    ) from None
                tags = dict(prompt.tags)
        kind = artifact_kind(tags)
        if kind is None:
            raise ArtifactNotFoundError(
                f"{name} exists in MLflow at {self.tracking_uri} but was not published by tracelearn "
                f"(no {TAG_KIND} tag); publish under another name"
            )
        self._kinds[name] = kind
        return kind, tags

    def _model_versions(self, name: str, kind: ArtifactKind, digest: str | None = None) -> list[Any]:
        # MLflow hides prompt versions from model-version searches unless the filter asks for them.
        where = [f"name = '{name}'"]
        if kind == "prompt":
            where.append(f"tags.`{PROMPT_MARKER_TAG}` = 'true'")
        if digest is not None:
            where.append(f"tags.`{TAG_DIGEST}` = '{digest}'")
        with self._translated(f"listing the versions of {name}"):
            return _all_pages(lambda token: self._client.search_model_versions(
                filter_string=" AND ".join(where), page_token=token))

    def _version_with_digest(self, name: str, kind: ArtifactKind, digest: str) -> ArtifactVersion | None:
        found = [self._to_version(name, kind, mv) for mv in self._model_versions(name, kind, digest)]
        matching = sorted((v for v in found if v is not None and v.digest == digest), key=lambda v: v.version)
        return matching[0] if matching else None

    def _to_version(self, name: str, kind: ArtifactKind, model_version: Any) -> ArtifactVersion | None:
        return version_from_tags(name, kind, int(model_version.version), dict(model_version.tags),
                                 f"MLflow at {self.tracking_uri}")

    def _checkpoint_run_id(self, version: ArtifactVersion) -> str:
        with self._translated(f"reading {version.ref}"):
            model_version = self._client.get_model_version(version.name, str(version.version))
        run_id = model_version.tags.get("tracelearn.run_id") or model_version.run_id
        if not run_id:
            raise ArtifactNotFoundError(
                f"{version.ref} in MLflow at {self.tracking_uri} names no run holding its files; republish it")
        return str(run_id)

    def _experiment(self) -> str:
        if self._experiment_id is None:
            with self._translated(f"opening experiment {EXPERIMENT_NAME}"):
                experiment = self._client.get_experiment_by_name(EXPERIMENT_NAME)
                if experiment is None:
                    try:
                        self._experiment_id = str(self._client.create_experiment(EXPERIMENT_NAME))
                    except Exception as error:
                        if _error_code(error) != "RESOURCE_ALREADY_EXISTS":
                            raise
                        experiment = self._client.get_experiment_by_name(EXPERIMENT_NAME)
                if experiment is not None:
                    self._experiment_id = str(experiment.experiment_id)
        assert self._experiment_id is not None
        return self._experiment_id

    def _alias_log_run(self, name: str, create: bool) -> tuple[ArtifactKind, str | None]:
        """The run whose params are ``name``'s alias log; with ``create``, made on the first move."""
        if name in self._alias_log_runs:
            return self._kind(name), self._alias_log_runs[name]
        kind, tags = self._artifact_tags(name)
        pointer = tags.get(TAG_ALIAS_LOG_RUN)
        if pointer:
            self._alias_log_runs[name] = pointer
        if pointer or not create:
            return kind, str(pointer) if pointer else None
        set_tag = self._client.set_prompt_tag if kind == "prompt" else self._client.set_registered_model_tag
        with self._translated(f"creating the alias log of {name}"):
            run = self._client.create_run(self._experiment(), run_name=f"alias-log/{name}",
                                          tags={TAG_ALIAS_LOG_FOR: name})
            mine = run.info.run_id
            # Tags are last-writer-wins: two first moves racing here both re-read the pointer, and the
            # one whose run lost deletes it and uses the winner's.
            set_tag(name, TAG_ALIAS_LOG_RUN, mine)
            self._client.set_terminated(mine)
            winner = str(self._artifact_tags(name)[1].get(TAG_ALIAS_LOG_RUN))
            if winner != mine:
                self._client.delete_run(mine)
        self._alias_log_runs[name] = winner
        return kind, winner

    def _logged_moves(self, run_id: str) -> dict[str, tuple[AliasMove, str]]:
        """Param key -> (move, writer token) of every logged move."""
        with self._translated(f"reading alias log run {run_id}"):
            params: dict[str, str] = dict(self._client.get_run(run_id).data.params)
        moves = {}
        for key, value in params.items():
            if key.startswith("alias/"):
                data = json.loads(value)
                moves[key] = (AliasMove.from_dict(data), str(data.get("writer", "")))
        return moves

    def _mirror_alias(self, move: AliasMove, kind: ArtifactKind) -> None:
        """Point MLflow's own alias where the log says.

        Checked again after setting it: a concurrent mover whose earlier move was mirrored later would
        otherwise leave MLflow's alias on a stale version.
        """
        for _ in range(3):
            holder = self._alias_holder(move.name, move.alias)
            if holder is None:
                return
            with self._translated(f"setting the MLflow alias {move.name}@{move.alias}"):
                if kind == "prompt":
                    self._client.set_prompt_alias(move.name, move.alias, holder)
                else:
                    self._client.set_registered_model_alias(move.name, move.alias, str(holder))
            if self._alias_holder(move.name, move.alias) == holder:
                return

    def _conflict(self, move: AliasMove, landed: AliasMove | None) -> AliasConflictError:
        other = f" by {landed.actor} to version {landed.version}" if landed else ""
        return AliasConflictError(
            f"{move.name}@{move.alias} move {move.sequence} was already made{other}; nothing changed: "
            "read the alias again and retry"
        )

    def _check_reachable(self) -> None:
        if not self.tracking_uri.startswith(("http://", "https://")):
            return
        try:
            with urllib.request.urlopen(f"{self.tracking_uri}/health", timeout=HEALTH_TIMEOUT_SECONDS):
                pass
        except urllib.error.HTTPError:
            pass  # it answered (a proxy or an auth layer in front of /health): reachable
        except (urllib.error.URLError, OSError) as error:
            raise RegistryError(
                f"cannot reach the MLflow tracking server at {self.tracking_uri} ({error}); "
                "check that it is running and the address is right (registry location mlflow+http://HOST:PORT)"
            ) from error

    @contextmanager
    def _translated(self, action: str) -> Iterator[None]:
        """MLflow and HTTP errors become registry errors that name the server and the action."""
        try:
            yield
        except RegistryError:
            raise
        except Exception as error:
            code = _error_code(error)
            if code == "RESOURCE_DOES_NOT_EXIST":
                raise ArtifactNotFoundError(
                    f"{action}: not found in MLflow at {self.tracking_uri} ({error})") from error
            if code is None and not isinstance(error, OSError | ConnectionError) \
                    and type(error).__module__.split(".")[0] not in ("requests", "urllib3"):
                raise
            if code == "INVALID_PARAMETER_VALUE":
                raise InvalidArtifactError(f"{action}: MLflow at {self.tracking_uri} refused it: {error}") from error
            raise RegistryError(f"{action}: MLflow at {self.tracking_uri} failed: {error}") from error


def _error_code(error: BaseException) -> str | None:
    """The ``error_code`` of an ``MlflowException`` (without importing mlflow here), else None."""
    code = getattr(error, "error_code", None)
    return str(code) if code is not None and type(error).__module__.startswith("mlflow") else None


def _all_pages(fetch: Callable[[str | None], Any]) -> list[Any]:
    items: list[Any] = []
    token: str | None = None
    while True:
        page = fetch(token)
        items.extend(page)
        token = page.token
        if not token:
            return items


def _listing(names: list[str], limit: int = 20) -> str:
    if not names:
        return "it holds no artifacts yet"
    shown = ", ".join(names[:limit])
    return f"it holds {shown}" + (f" and {len(names) - limit} more" if len(names) > limit else "")
