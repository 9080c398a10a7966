"""Paths that may be object-storage URLs (`gs://bucket/run`, `s3://...`, any fsspec protocol) or local paths.

Local paths go through `os` and `shutil` exactly as they always did; URLs go through fsspec (`gcsfs` for
`gs://`, `s3fs` for `s3://`: installed separately, e.g. `pip install gcsfs`). Object stores have no
directories, no appends and no renames: a "directory" is a key prefix, a rename copies then deletes, and a
file that grows (metrics, TensorBoard events) is written locally and uploaded whole (`RunDir.upload_logs`).

Checkpoints are written by Orbax through TensorStore, which (orbax-checkpoint 0.12) writes to local paths and
to `gs://` only: `checkpoint_location_problem` names the other URLs before a run starts.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import shutil
import tempfile

CHECKPOINT_SCHEMES = ("gs",)  # the URL schemes Orbax's TensorStore layer writes checkpoints to
_PACKAGES = {"gs": "gcsfs", "gcs": "gcsfs", "s3": "s3fs", "s3a": "s3fs", "az": "adlfs", "abfs": "adlfs"}


class StorageError(OSError):
    """A URL that cannot be used: its fsspec package is missing, or the store refused the operation."""


def scheme(path: str) -> str | None:
    """`gs` for `gs://bucket/x`; None for a local path (including `file://` URLs' paths)."""
    head, sep, _ = str(path).partition("://")
    return head.lower() if sep and head.isidentifier() and head.lower() != "file" else None


def is_url(path: str) -> bool:
    return scheme(path) is not None


def local_path(path: str) -> str:
    """A `file://` URL's path; anything else unchanged."""
    path = str(path)
    return path[len("file://"):] if path.startswith("file://") else path


def absolute(path: str) -> str:
    """A local path made absolute; a URL as it is (os.path.abspath would turn `gs://b` into `$PWD/gs:/b`)."""
    return path if is_url(path) else os.path.abspath(local_path(path))


def join(path: str, *parts: str) -> str:
    if is_url(path):
        return posixpath.join(path.rstrip("/"), *parts)
    return os.path.join(local_path(path), *parts)


def basename(path: str) -> str:
    return posixpath.basename(path.rstrip("/")) if is_url(path) else os.path.basename(path)


def dirname(path: str) -> str:
    return posixpath.dirname(path.rstrip("/")) if is_url(path) else os.path.dirname(path)


def filesystem(url: str):
    """The fsspec filesystem of `url` and the path within it; a missing package is named with how to install it."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as e:
        package = _PACKAGES.get(scheme(url), "the fsspec implementation of this protocol")
        raise StorageError(f"{url!r}: reading and writing {scheme(url)}:// paths needs {package} "
                           f"(pip install {package}): {e}") from None
    except ValueError as e:  # an unknown protocol
        raise StorageError(f"{url!r}: {e}") from None


def exists(path: str) -> bool:
    if not is_url(path):
        return os.path.exists(local_path(path))
    fs, inner = filesystem(path)
    return fs.exists(inner)


def isdir(path: str) -> bool:
    """A local directory, or a URL prefix that holds at least one object."""
    if not is_url(path):
        return os.path.isdir(local_path(path))
    fs, inner = filesystem(path)
    return fs.isdir(inner)


def isfile(path: str) -> bool:
    if not is_url(path):
        return os.path.isfile(local_path(path))
    fs, inner = filesystem(path)
    return fs.isfile(inner)


def listdir(path: str) -> list[str]:
    """The names (not paths) directly under `path`, sorted."""
    if not is_url(path):
        return sorted(os.listdir(local_path(path)))
    fs, inner = filesystem(path)
    return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(inner, detail=False)
                  if p.rstrip("/") != inner.rstrip("/"))


def makedirs(path: str) -> None:
    """Create a local directory (and its parents); nothing to do under a URL (prefixes exist with their objects)."""
    if not is_url(path):
        os.makedirs(local_path(path), exist_ok=True)


def open_file(path: str, mode: str = "r", **kwargs):
    """`open` for local paths, `fsspec.open` for URLs (binary or text modes; no appends on object stores)."""
    if not is_url(path):
        return open(local_path(path), mode, **kwargs)
    if "a" in mode:
        raise StorageError(f"{path!r}: object stores cannot append to a file")
    fs, inner = filesystem(path)
    return fs.open(inner, mode, **kwargs)


def create_exclusive(path: str, data: bytes) -> bool:
    """Write `data` to `path` only if nothing is there; False if something is. Local: O_EXCL. URL: the store's
    create-only write (GCS `ifGenerationMatch=0` through gcsfs' mode "xb"), else a check then a write."""
    if not is_url(path):
        try:
            fd = os.open(local_path(path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True
    fs, inner = filesystem(path)
    if fs.exists(inner):
        return False
    try:
        with fs.open(inner, "xb") as f:
            f.write(data)
    except FileExistsError:
        return False
    except ValueError:  # a filesystem without create-only writes: the check above is all there is
        with fs.open(inner, "wb") as f:
            f.write(data)
    return True


def remove(path: str) -> None:
    """Delete a file, if it is there."""
    if not is_url(path):
        try:
            os.remove(local_path(path))
        except FileNotFoundError:
            pass
        return
    fs, inner = filesystem(path)
    if fs.exists(inner):
        fs.rm(inner)


def move(source: str, target: str) -> None:
    """Rename a file or directory; under a URL, copy every object under `source` to `target`, then delete."""
    if not is_url(source) and not is_url(target):
        os.rename(local_path(source), local_path(target))
        return
    fs, inner = filesystem(source)
    _, inner_target = filesystem(target)
    fs.mv(inner, inner_target, recursive=True)


def copy_file(source: str, target: str) -> None:
    """Copy one file's content between any two places (local or URL); a new local file's mode follows the umask."""
    if not is_url(source) and not is_url(target):
        shutil.copyfile(local_path(source), local_path(target))
        return
    with open_file(source, "rb") as f, open_file(target, "wb") as g:
        shutil.copyfileobj(f, g, 1 << 20)


def local_copy(path: str, names: list[str] | None = None) -> str:
    """`path` itself when local; for a URL, a local copy of it (a file, or the files `names` of a directory,
    or all of its files) in a cache directory named after the URL, for libraries that read local files only
    (tokenizers). Copied again each call: a cache never shadows a newer upload."""
    if not is_url(path):
        return local_path(path)
    target = os.path.join(tempfile.gettempdir(), "granite_jax-storage",
                          hashlib.sha256(path.encode()).hexdigest()[:16])
    if not isdir(path):
        os.makedirs(target, exist_ok=True)
        file = os.path.join(target, basename(path))
        copy_file(path, file)
        return file
    shutil.rmtree(target, ignore_errors=True)
    os.makedirs(target)
    for name in names if names is not None else listdir(path):
        if isfile(join(path, name)):
            copy_file(join(path, name), os.path.join(target, name))
    return target


def checkpoint_location_problem(path: str) -> str | None:
    """Why checkpoints cannot be written under `path` (None if they can): Orbax writes local paths and gs://."""
    if scheme(path) is None or scheme(path) in CHECKPOINT_SCHEMES:
        return None
    return (f"checkpoints cannot be written to {scheme(path)}:// paths (Orbax writes them through TensorStore, "
            f"to local paths and to {', '.join(s + '://' for s in CHECKPOINT_SCHEMES)} only): mount the bucket "
            "(e.g. mountpoint-s3, gcsfuse) and give its local path")
