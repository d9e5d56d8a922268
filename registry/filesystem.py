"""The registry on a local directory or any pyarrow filesystem (``s3://``, ``gs://``, ``file://``).

Layout under the root, one folder per artifact name::

    NAME/versions/N/claim.json          the publisher that took number N (created exclusively)
    NAME/versions/N/files/...           the version's files
    NAME/versions/N/version.json        manifest, lineage, metadata: written last, so a version is
                                        visible only once all its files are in place (never torn)
    NAME/digests/DIGEST                 manifest digest -> version number (identical content is reused)
    NAME/aliases/ALIAS/SEQ.json         the alias's audit log, one immutable entry per move

Nothing is ever overwritten: numbers, digests and alias moves are all taken by *exclusive create*.
On a local disk that is ``link(2)`` of a fully written temporary file (atomic, fails if the name
exists). Object stores have no such call, so there a name is taken by a claim protocol that relies
on their read-after-write and list-after-write consistency (S3 and GCS give both): write a unique
claim object, list the claims, and win only when yours is the only one; losers withdraw theirs and
retry. Two publishers racing therefore both succeed with distinct numbers, and two promotions racing
for the same move sequence leave exactly one winner (the other gets ``AliasConflictError``).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path

import pyarrow.fs as pafs

from tracelearn.registry.artifacts import (
    AliasConflictError,
    AliasMove,
    ArtifactKind,
    ArtifactNotFoundError,
    ArtifactVersion,
    Lineage,
    Published,
    RegistryError,
    RegistryWriteError,
    check_name,
    manifest_digest,
)
from tracelearn.registry.backend import Registry, registry_cache_dir, utc_now
from tracelearn.registry.contents import SourceContents, verify_stored
from tracelearn.storage.atomic_files import fsync_directory

# Publishers racing for one version number retry with a fresh number; the bound only stops a livelock.
_MAX_CLAIM_ATTEMPTS = 64
# A claim on object storage is held for milliseconds; one this old belongs to a writer that died.
_STALE_CLAIM_SECONDS = 60.0


class _LocalStore:
    """Files on a local disk, with ``link(2)`` for exclusive create and ``rename(2)`` for atomic replace."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def describe(self, path: str) -> str:
        return str(self.root / path)

    def read(self, path: str) -> bytes | None:
        try:
            return (self.root / path).read_bytes()
        except FileNotFoundError:
            return None

    def list_names(self, path: str) -> list[str]:
        try:
            return sorted(entry.name for entry in os.scandir(self.root / path))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def create_exclusive(self, path: str, data: bytes) -> bool:
        target = self.root / path
        with _write_errors(target):
            target.parent.mkdir(parents=True, exist_ok=True)
            temporary = self._write_temporary(target, data)
            try:
                os.link(temporary, target)
                return True
            except FileExistsError:
                return False
            finally:
                temporary.unlink()

    def write_atomic(self, path: str, data: bytes) -> None:
        target = self.root / path
        with _write_errors(target):
            target.parent.mkdir(parents=True, exist_ok=True)
            self._write_temporary(target, data).replace(target)
            fsync_directory(target.parent)

    def upload(self, source: Path, path: str) -> None:
        target = self.root / path
        with _write_errors(target):
            target.parent.mkdir(parents=True, exist_ok=True)
            with source.open("rb") as reader, target.open("wb") as writer:
                shutil.copyfileobj(reader, writer, 1 << 20)
                writer.flush()
                os.fsync(writer.fileno())

    def delete(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.root / path).unlink()

    def remove_tree(self, path: str) -> None:
        shutil.rmtree(self.root / path, ignore_errors=True)

    def local_directory(self, path: str) -> Path | None:
        return self.root / path

    def download(self, path: str, destination: Path) -> None:  # pragma: no cover - local files are read in place
        shutil.copyfile(self.root / path, destination)

    @staticmethod
    def _write_temporary(target: Path, data: bytes) -> Path:
        handle, name = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        return Path(name)


class _ArrowStore:
    """Files on a pyarrow filesystem (object storage): single-object writes are atomic, names are claimed."""

    def __init__(self, filesystem: pafs.FileSystem, root: str, uri: str) -> None:
        self.filesystem = filesystem
        self.root = root.rstrip("/")
        self.uri = uri.rstrip("/")

    def describe(self, path: str) -> str:
        return f"{self.uri}/{path}"

    def _full(self, path: str) -> str:
        return f"{self.root}/{path}"

    def read(self, path: str) -> bytes | None:
        try:
            with self.filesystem.open_input_stream(self._full(path)) as stream:
                return bytes(stream.read())
        except FileNotFoundError:
            return None
        except OSError as error:
            if "does not exist" in str(error) or "NoSuchKey" in str(error):
                return None
            raise RegistryError(f"cannot read {self.describe(path)}: {error}") from error

    def list_names(self, path: str) -> list[str]:
        selector = pafs.FileSelector(self._full(path), allow_not_found=True, recursive=False)
        try:
            infos = self.filesystem.get_file_info(selector)
        except OSError as error:
            raise RegistryError(f"cannot list {self.describe(path)}: {error}") from error
        return sorted(info.base_name for info in infos)

    def create_exclusive(self, path: str, data: bytes) -> bool:
        claims = f"{path}.claims"
        mine = uuid.uuid4().hex
        for attempt in range(_MAX_CLAIM_ATTEMPTS):
            if self.read(path) is not None:
                return False
            self.write_atomic(f"{claims}/{mine}", b"")
            if self._live_claims(claims) == [mine]:
                self.write_atomic(path, data)
                return True
            # Someone else claimed the name too and nobody can be sure to be alone: withdraw and look again
            # after a random pause. A winner saw only its own claim and keeps it, so it is never displaced.
            self.delete(f"{claims}/{mine}")
            time.sleep(random.uniform(0.005, 0.02 * (attempt + 1)))
        raise RegistryError(f"could not create {self.describe(path)}: {_MAX_CLAIM_ATTEMPTS} contested attempts")

    def _live_claims(self, claims: str) -> list[str]:
        """Claim names, ignoring claims older than ``_STALE_CLAIM_SECONDS`` (their writer died mid-claim)."""
        selector = pafs.FileSelector(self._full(claims), allow_not_found=True, recursive=False)
        try:
            infos = self.filesystem.get_file_info(selector)
        except OSError as error:
            raise RegistryError(f"cannot list {self.describe(claims)}: {error}") from error
        now = time.time()
        return sorted(info.base_name for info in infos
                      if info.mtime is None or now - info.mtime.timestamp() < _STALE_CLAIM_SECONDS)

    def write_atomic(self, path: str, data: bytes) -> None:
        try:
            with self.filesystem.open_output_stream(self._full(path)) as stream:
                stream.write(data)
        except OSError as error:
            raise RegistryWriteError(f"cannot write {self.describe(path)}: {error}") from error

    def upload(self, source: Path, path: str) -> None:
        try:
            with source.open("rb") as reader, self.filesystem.open_output_stream(self._full(path)) as writer:
                while chunk := reader.read(1 << 22):
                    writer.write(chunk)
        except OSError as error:
            raise RegistryWriteError(f"cannot write {self.describe(path)}: {error}") from error

    def delete(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError, OSError):
            self.filesystem.delete_file(self._full(path))

    def remove_tree(self, path: str) -> None:
        with contextlib.suppress(OSError):
            self.filesystem.delete_dir(self._full(path))

    def local_directory(self, path: str) -> Path | None:
        return None

    def download(self, path: str, destination: Path) -> None:
        with self.filesystem.open_input_stream(self._full(path)) as reader, destination.open("wb") as writer:
            while chunk := reader.read(1 << 22):
                writer.write(chunk)


class FilesystemRegistry(Registry):
    """The registry in a directory: ``/srv/registry``, ``file:///srv/registry`` or ``s3://bucket/registry``."""

    def __init__(self, location: str | Path, cache_dir: Path | None = None) -> None:
        self.location = str(location)
        self._store: _LocalStore | _ArrowStore
        if "://" in self.location and not self.location.startswith("file://"):
            try:
                filesystem, root = pafs.FileSystem.from_uri(self.location)
            except (OSError, ValueError) as error:
                raise RegistryError(f"cannot open registry {self.location}: {error}") from error
            self._store = _ArrowStore(filesystem, root, self.location)
        else:
            self._store = _LocalStore(Path(self.location.removeprefix("file://")).expanduser())
        self._cache_dir = cache_dir or registry_cache_dir()
        # Published versions and alias moves are immutable: once read, they never need reading again.
        self._versions: dict[tuple[str, int], ArtifactVersion] = {}
        self._moves: dict[tuple[str, str, int], AliasMove] = {}

    # ---- reading ----------------------------------------------------------------------------------

    def names(self) -> list[str]:
        return [name for name in self._store.list_names("") if not name.startswith(".")]

    def versions(self, name: str) -> list[ArtifactVersion]:
        check_name(name)
        numbers = self._version_numbers(name)
        if not numbers and name not in self.names():
            known = ", ".join(self.names()) or "none"
            raise ArtifactNotFoundError(f"no artifact named {name!r} in {self.location} (artifacts: {known})")
        found = []
        for number in numbers:
            version = self._read_version(name, number)
            if version is not None:
                found.append(version)
        return found

    def alias_moves(self, name: str, alias: str | None = None) -> list[AliasMove]:
        self.versions(name)  # unknown name -> ArtifactNotFoundError
        aliases = [alias] if alias else self._store.list_names(f"{name}/aliases")
        moves = []
        for each in aliases:
            for entry in self._store.list_names(f"{name}/aliases/{each}"):
                if entry.endswith(".json") and entry[:-5].isdigit():
                    move = self._read_move(name, each, int(entry[:-5]))
                    if move is not None:
                        moves.append(move)
        return sorted(moves, key=lambda move: (move.moved_at, move.alias, move.sequence))

    def local_path(self, version: ArtifactVersion, verify: bool = True) -> Path:
        label = f"{version.ref} in {self.location}"
        files_path = f"{version.name}/versions/{version.version}/files"
        local = self._store.local_directory(files_path)
        if local is None:
            local = self._download(version, files_path)
        if verify:
            verify_stored(local, version, label)
        return local

    # ---- writing ----------------------------------------------------------------------------------

    def _store_version(self, kind: ArtifactKind, name: str, contents: SourceContents, lineage: Lineage,
                       metadata: Mapping[str, str]) -> Published:
        digest = manifest_digest(contents.files)
        existing = self._version_by_digest(name, digest)
        if existing is not None:
            return Published(existing, created=False)
        number = self._claim_version_number(name)
        prefix = f"{name}/versions/{number}"
        version = ArtifactVersion(name, number, kind, contents.format, digest, contents.files, utc_now(), lineage,
                                  dict(metadata))
        try:
            for relative, source in contents.sources.items():
                self._store.upload(source, f"{prefix}/files/{relative}")
            self._store.write_atomic(f"{prefix}/version.json", _encode(version.to_dict()))
        except BaseException:
            # The version never became visible; freeing its number keeps the numbering without holes.
            self._store.remove_tree(prefix)
            raise
        self._store.create_exclusive(f"{name}/digests/{digest}", str(number).encode())
        self._versions[(name, number)] = version
        return Published(version, created=True)

    def _append_alias_move(self, move: AliasMove) -> AliasMove:
        path = f"{move.name}/aliases/{move.alias}/{move.sequence:08d}.json"
        if not self._store.create_exclusive(path, _encode(move.to_dict())):
            winner = self._read_move(move.name, move.alias, move.sequence)
            holder = f"version {winner.version} by {winner.actor}" if winner else "another process"
            raise AliasConflictError(
                f"{move.name}@{move.alias} was moved concurrently (to {holder}); your move to version "
                f"{move.version} was not applied: check `tracelearn registry show {move.name}` and retry"
            )
        self._moves[(move.name, move.alias, move.sequence)] = move
        return move

    # ---- helpers ----------------------------------------------------------------------------------

    def _version_numbers(self, name: str) -> list[int]:
        return sorted(int(entry) for entry in self._store.list_names(f"{name}/versions") if entry.isdigit())

    def _highest_claimed(self, name: str) -> int:
        """The highest number a publisher took; a folder left without a claim (a write refused) is free."""
        for number in reversed(self._version_numbers(name)):
            if self._store.read(f"{name}/versions/{number}/claim.json") is not None:
                return number
        return 0

    def _read_version(self, name: str, number: int) -> ArtifactVersion | None:
        cached = self._versions.get((name, number))
        if cached is not None:
            return cached
        raw = self._store.read(f"{name}/versions/{number}/version.json")
        if raw is None:
            return None  # being published (or its publisher died): not visible
        try:
            version = ArtifactVersion.from_dict(json.loads(raw))
        except (ValueError, KeyError, TypeError) as error:
            raise RegistryError(
                f"{self._store.describe(f'{name}/versions/{number}/version.json')} is unreadable: {error}"
            ) from error
        self._versions[(name, number)] = version
        return version

    def _read_move(self, name: str, alias: str, sequence: int) -> AliasMove | None:
        key = (name, alias, sequence)
        if key in self._moves:
            return self._moves[key]
        raw = self._store.read(f"{name}/aliases/{alias}/{sequence:08d}.json")
        if raw is None:
            return None
        move = AliasMove.from_dict(json.loads(raw))
        self._moves[key] = move
        return move

    def _version_by_digest(self, name: str, digest: str) -> ArtifactVersion | None:
        raw = self._store.read(f"{name}/digests/{digest}")
        if raw is None:
            return None
        return self._read_version(name, int(raw))

    def _claim_version_number(self, name: str) -> int:
        for attempt in range(_MAX_CLAIM_ATTEMPTS):
            number = self._highest_claimed(name) + 1
            claim = {"claimed_at": utc_now(), "pid": os.getpid(), "host": os.uname().nodename}
            if self._store.create_exclusive(f"{name}/versions/{number}/claim.json", _encode(claim)):
                return number
            # Jitter so two publishers that both withdrew (object stores) do not collide again in lockstep.
            time.sleep(random.uniform(0, 0.01 * (attempt + 1)))
        raise RegistryError(f"could not take a version number for {name} after {_MAX_CLAIM_ATTEMPTS} attempts")

    def _download(self, version: ArtifactVersion, files_path: str) -> Path:
        """Copy a remote version into the local cache once (keyed by digest), atomically."""
        target = self._cache_dir / version.digest
        if target.is_dir():
            return target
        with _write_errors(self._cache_dir):
            self._cache_dir.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{version.digest[:12]}-", dir=self._cache_dir))
        try:
            for entry in version.files:
                destination = staging / entry.path
                destination.parent.mkdir(parents=True, exist_ok=True)
                self._store.download(f"{files_path}/{entry.path}", destination)
            try:
                staging.rename(target)
            except OSError:
                if not target.is_dir():  # not "another process downloaded it first"
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return target


def _encode(document: Mapping[str, object]) -> bytes:
    return json.dumps(document, indent=1, sort_keys=True).encode()


@contextlib.contextmanager
def _write_errors(path: Path) -> Iterator[None]:
    """Turn the OS refusing a write (read-only disk, permissions, full disk) into one clear registry error."""
    try:
        yield
    except OSError as error:
        if isinstance(error, FileExistsError):
            raise
        reason = {errno.EROFS: "the disk is read-only", errno.EACCES: "permission denied",
                  errno.EPERM: "permission denied", errno.ENOSPC: "the disk is full",
                  errno.EFBIG: "the file size limit was reached"}.get(error.errno or 0, str(error))
        raise RegistryWriteError(f"cannot write to the registry at {path}: {reason}; nothing was published") from error
