"""A local fake of Google Cloud Storage for tests: gcp-storage-emulator's JSON API on localhost, in memory.

Both clients that touch `gs://` are pointed at it through their documented variables: gcsfs (our own files,
through fsspec) by STORAGE_EMULATOR_HOST, TensorStore (Orbax's checkpoint arrays) by TENSORSTORE_GCS_HTTP_URL.
No network and no credentials: both fall back to anonymous requests.

Two things real GCS does that the emulator does not are added (`_with_generations`): media downloads carry the
`x-goog-generation` header (TensorStore reads it to make its conditional writes, e.g. OCDBT manifests), and
writes and deletes honour `ifGenerationMatch` (a create-only write, `ifGenerationMatch=0`, of an existing
object fails with 412: the run lock relies on it).
"""

from __future__ import annotations

import contextlib
import logging
import os

from granite_jax.parallel.distributed import free_local_port

BUCKET = "granite-test"


def _with_generations() -> None:
    """Patch the emulator's object handlers (once per process) as the module docstring says."""
    from http import HTTPStatus

    from gcp_storage_emulator import server
    from gcp_storage_emulator.exceptions import NotFound
    from gcp_storage_emulator.handlers import objects

    if getattr(objects, "_granite_patched", False):
        return
    download, insert, delete = objects.download, objects.insert, objects.delete

    def current_generation(request, storage, name) -> str:
        try:
            return str(storage.get_file_obj(request.params["bucket_name"], name)["generation"])
        except NotFound:
            return "0"

    def precondition_failed(request, storage, name) -> bool:
        wanted = request.query.get("ifGenerationMatch")
        return bool(wanted) and wanted[0] != current_generation(request, storage, name)

    def download_with_generation(request, response, storage, *args, **kwargs):
        download(request, response, storage, *args, **kwargs)
        generation = current_generation(request, storage, request.params["object_id"])
        if generation != "0":
            response["x-goog-generation"] = generation

    def conditional_insert(request, response, storage, *args, **kwargs):
        name = (request.query.get("name") or [None])[0]
        if name is None and (request.query.get("uploadType") or [None])[0] == "multipart":
            name = request.data["meta"].get("name")  # gcsfs names the object in the body's metadata part
        if name is not None and precondition_failed(request, storage, name):
            response.status = HTTPStatus.PRECONDITION_FAILED
            return
        insert(request, response, storage, *args, **kwargs)

    def conditional_delete(request, response, storage, *args, **kwargs):
        if precondition_failed(request, storage, request.params["object_id"]):
            response.status = HTTPStatus.PRECONDITION_FAILED
            return
        delete(request, response, storage, *args, **kwargs)

    replace = {download: download_with_generation, insert: conditional_insert, delete: conditional_delete}
    objects.download = download_with_generation  # `objects.get` calls it for ?alt=media
    server.HANDLERS = tuple((regex, {method: replace.get(handler, handler) for method, handler in handlers.items()})
                            for regex, handlers in server.HANDLERS)
    objects._granite_patched = True


@contextlib.contextmanager
def fake_gcs():
    """Run the fake for the duration of the block; yields the environment variables that point clients at it
    (already set in this process's os.environ; pass them to subprocesses)."""
    from gcp_storage_emulator.server import create_server

    for name in ("gcp_storage_emulator", "gcsfs", "google", "urllib3"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    _with_generations()
    port = free_local_port()
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
    server.start()
    server._api._httpd.handle_error = lambda *args: None  # clients that close early: not the test's failure
    url = f"http://127.0.0.1:{port}"
    env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield env
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
