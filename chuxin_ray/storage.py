"""URIs -> pyarrow filesystems, atomic writes, and stage manifests.

Every byte chuxin_ray reads or writes goes through a `Location`: a pyarrow filesystem plus the path
that filesystem understands, plus the URI the user wrote (which never carries credentials, so it is
what logs, manifests and errors show).

    s3://bucket/prefix   S3 or any S3-compatible store (endpoint from config or AWS_ENDPOINT_URL)
    gs://bucket/prefix   Google Cloud Storage (credentials from the environment)
    file:///abs/path     local disk
    relative/or/abs      local disk

A stage output is committed by its `_manifest.json`, written last: a reader trusts only outputs with
a complete manifest, and only the files it lists.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import time
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import pyarrow.fs as pafs

from chuxin_ray.config import StorageConfig

MANIFEST = "_manifest.json"
log = logging.getLogger(__name__)


class StorageError(RuntimeError):
    """A URI that cannot be used; the message names the URI (never credentials)."""


@dataclass(frozen=True)
class Location:
    fs: pafs.FileSystem
    path: str  # what `fs` understands: "bucket/key" for object stores, an absolute path locally
    uri: str  # what the user wrote, normalised; safe to print

    def child(self, *parts: str) -> Location:
        clean = [p.strip("/") for p in parts if p.strip("/")]
        return Location(self.fs, posixpath.join(self.path, *clean), "/".join([self.uri.rstrip("/"), *clean]))

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def uri_of(self, fs_path: str) -> str:
        """The URI of a path below this location, as the filesystem returned it."""
        rel = posixpath.relpath(fs_path, self.path) if fs_path != self.path else ""
        return self.uri if rel in ("", ".") else f"{self.uri.rstrip('/')}/{rel}"


def resolve(uri: str, storage: StorageConfig | None = None) -> Location:
    """Turn a URI into a Location. Raises StorageError for an unsupported scheme or a bad URI."""
    storage = storage or StorageConfig()
    parsed = urlparse(uri)
    scheme = parsed.scheme.lower()
    if scheme in ("", "file") or (len(scheme) == 1 and os.name == "nt"):
        path = parsed.path if scheme == "file" else uri
        path = os.path.abspath(os.path.expanduser(path))
        return Location(pafs.LocalFileSystem(), path, path if scheme == "" else f"file://{path}")
    if scheme in ("s3", "s3a"):
        bucket, key = _bucket_key(uri, parsed)
        safe = f"s3://{bucket}/{key}".rstrip("/")
        return Location(s3_filesystem(storage), f"{bucket}/{key}".rstrip("/"), safe)
    if scheme in ("gs", "gcs"):
        bucket, key = _bucket_key(uri, parsed)
        fs = pafs.GcsFileSystem(anonymous=storage.anonymous)
        return Location(fs, f"{bucket}/{key}".rstrip("/"), f"gs://{bucket}/{key}".rstrip("/"))
    raise StorageError(
        f"unsupported URI scheme {scheme!r} in {_safe(uri)}; use s3://, gs://, file:// or a path"
    )


def _bucket_key(uri: str, parsed) -> tuple[str, str]:
    if parsed.username or parsed.password:
        raise StorageError(f"credentials in a URI are not allowed ({_safe(uri)}); use storage.* or AWS_* env")
    bucket = parsed.hostname or ""
    if len(bucket) < 3:
        raise StorageError(f"{_safe(uri)}: bucket name must have at least 3 characters")
    return bucket, parsed.path.lstrip("/")


def _safe(uri: str) -> str:
    """A URI with any user:password@ part removed, for messages."""
    parsed = urlparse(uri)
    if parsed.username or parsed.password:
        return parsed._replace(netloc=parsed.hostname or "").geturl()
    return uri


def s3_filesystem(storage: StorageConfig) -> pafs.S3FileSystem:
    """An S3FileSystem built explicitly: a bare S3FileSystem() ignores AWS_ENDPOINT_URL."""
    env = os.environ
    endpoint = storage.endpoint_url or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    kwargs: dict[str, Any] = {
        "region": storage.region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1",
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=5),
        # a file written whole before its first part fills (every shard here) goes up as one PUT,
        # not a multipart upload's three requests; errors then surface on close, inside write_bytes
        "allow_delayed_open": True,
    }
    if endpoint:
        ep = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs["endpoint_override"] = ep.netloc
        kwargs["scheme"] = ep.scheme
    if storage.anonymous:
        kwargs["anonymous"] = True
        return pafs.S3FileSystem(**kwargs)
    access = _secret(storage.access_key_id) or env.get("AWS_ACCESS_KEY_ID")
    secret = _secret(storage.secret_access_key) or env.get("AWS_SECRET_ACCESS_KEY")
    token = _secret(storage.session_token) or env.get("AWS_SESSION_TOKEN")
    if access and secret:
        kwargs.update(access_key=access, secret_key=secret)
        if token:
            kwargs["session_token"] = token
    # else: pyarrow's default chain (instance profile, IRSA / workload identity web token)
    return pafs.S3FileSystem(**kwargs)


def _secret(value) -> str | None:
    return value.get_secret_value() if value is not None else None


# --------------------------------------------------------------------------------------------------
# Listing, reading, writing
# --------------------------------------------------------------------------------------------------


def exists(loc: Location) -> bool:
    return loc.fs.get_file_info(loc.path).type != pafs.FileType.NotFound


def list_files(loc: Location, suffixes: tuple[str, ...] = ()) -> list[pafs.FileInfo]:
    """Files at `loc` (a file, or every file below a prefix), sorted by path. Names starting with
    `_` or `.` (manifests, temporaries) are skipped, as Hadoop and Spark do."""
    info = loc.fs.get_file_info(loc.path)
    if info.type == pafs.FileType.File:
        return [info]
    if info.type == pafs.FileType.NotFound:
        raise StorageError(f"nothing found at {loc.uri}")
    selector = pafs.FileSelector(loc.path, recursive=True)
    files = [
        f
        for f in loc.fs.get_file_info(selector)
        if f.type == pafs.FileType.File
        and not any(part[:1] in ("_", ".") for part in posixpath.relpath(f.path, loc.path).split("/"))
        and (not suffixes or f.path.endswith(suffixes))
    ]
    return sorted(files, key=lambda f: f.path)


def read_bytes(loc: Location) -> bytes:
    with loc.fs.open_input_stream(loc.path) as f:
        return f.read()


def write_bytes(loc: Location, data) -> None:
    """Write a whole file atomically: readers see the old state or the new file, never a part.

    Local disk: a temporary name in the same directory, then rename. Object stores: one PUT or a
    multipart upload, which the store makes visible only when it completes (on close), so the
    object appears whole or not at all."""
    parent = posixpath.dirname(loc.path)
    if loc.is_local:
        loc.fs.create_dir(parent, recursive=True)
        tmp = posixpath.join(parent, f".tmp-{uuid.uuid4().hex}-{posixpath.basename(loc.path)}")
        with loc.fs.open_output_stream(tmp) as f:
            f.write(data)
        loc.fs.move(tmp, loc.path)
    else:
        with loc.fs.open_output_stream(loc.path) as f:
            f.write(data)


def read_json(loc: Location) -> Any:
    return json.loads(read_bytes(loc))


def write_json(loc: Location, data: Any) -> None:
    write_bytes(loc, json.dumps(data, indent=2, ensure_ascii=False, sort_keys=False).encode("utf-8"))


def delete_dir(loc: Location) -> None:
    if exists(loc):
        loc.fs.delete_dir(loc.path)


def delete_if_exists(loc: Location) -> None:
    """Delete one file; nothing to do when it is not there (a retried task deleting again)."""
    if exists(loc):
        loc.fs.delete_file(loc.path)


# --------------------------------------------------------------------------------------------------
# Stage manifests
# --------------------------------------------------------------------------------------------------


def read_manifest(out: Location) -> dict[str, Any] | None:
    """The manifest of a stage output, or None when the output is absent or incomplete."""
    loc = out.child(MANIFEST)
    if not exists(loc):
        return None
    manifest = read_json(loc)
    return manifest if manifest.get("status") == "complete" else None


def write_manifest(out: Location, manifest: dict[str, Any]) -> None:
    write_json(out.child(MANIFEST), manifest)


class OutputConflict(RuntimeError):
    """A complete output exists but was written by a different config."""


def begin_stage(
    stage: str, out: Location, config_hash: str, force: bool, subdirs: tuple[str, ...]
) -> dict | None:
    """Decide what a stage does with its output location before any work starts.

    Returns the manifest when the output is already complete for this config: the caller does
    nothing. Raises OutputConflict when it is complete for another config (unless `force`).
    Otherwise clears what a failed earlier attempt left in `subdirs` and returns None."""
    manifest = read_manifest(out)
    if manifest is not None and not force:
        if manifest.get("config_hash") == config_hash:
            return manifest
        raise OutputConflict(
            f"{stage}: {out.uri} holds a complete output of another config "
            f"(config hash {manifest.get('config_hash')}, this config {config_hash}); "
            f"choose another output or pass --force to overwrite it"
        )
    if exists(out.child(MANIFEST)):
        out.fs.delete_file(out.child(MANIFEST).path)
    for sub in subdirs:
        delete_dir(out.child(sub))
    return None


def report_complete(stage: str, out: Location, manifest: dict) -> dict:
    """What a stage does when its output is already complete for its config: say so, return it."""
    log.info(
        "%s: %s is already complete (finished %s); nothing to do", stage, out.uri, manifest["finished_at"]
    )
    return manifest


def stage_manifest(
    stage: str,
    config_hash: str,
    config: dict,
    inputs: list,
    counts: dict,
    files: dict,
    started: float,
    **extra: Any,
) -> dict[str, Any]:
    """The record a stage leaves beside its output; `status: complete` is written last of all."""
    from chuxin_ray import __version__

    finished = time.time()
    return {
        "stage": stage,
        "status": "complete",
        "package_version": __version__,
        "config_hash": config_hash,
        "config": config,
        "inputs": inputs,
        "counts": counts,
        "files": files,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(finished)),
        "duration_s": round(finished - started, 3),
        **extra,
    }
