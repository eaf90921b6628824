"""Local copies of registered models, keyed on what identifies their content, checked before every use.

    export_dir, version = resolve_model("models:/ads-relevance@champion", "sqlite:////srv/mlflow.db")
    export_dir, version = resolve_model("runs/demo/export")          # a folder: used as it is

A registry reference resolves to one model version, whose identity is (registry URI, name, version, source
run, artifact source, creation time). Two registries may both hold ``ads-relevance`` version 1, so the
cache folder is named by a digest of that whole identity, never by name and version alone:

    <cache_dir>/<name>-v<version>-<identity digest>/        the export folder, downloaded once
        _registry.json                                      the identity it was downloaded for + content digest

Before a cached copy is used, its recorded identity must equal the registry's answer now, and the bytes of
its factors must still hash to the digest in its manifest (``model_version: export-<digest>``). A copy that
fails either check is downloaded again. ``cache_dir`` defaults to ``$XDG_CACHE_HOME/ads-relevance/models``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from kernel import storage
from kernel.atomic import publish_dir, staging_dir, write_json_atomic
from kernel.errors import ConfigError, DataError
from kernel.hashing import json_digest
from kernel.mlflow_client import mlflow_client
from serving.layout import ADAPTERS_DIR, BASE_DIR, MANIFEST_FILE, REGISTERED_FILE, factors_digest, read_manifest

IDENTITY_FILE = "_registry.json"


def default_cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "ads-relevance" / "models"


def normalize_uri(uri: str) -> str:
    """sqlite URIs with an absolute path (a relative one names a different file from each directory)."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    return uri


def registry_uri(tracking_uri: str | None, what: str) -> str:
    """The explicit URI, else $MLFLOW_TRACKING_URI; never MLflow's implicit ./mlflow.db."""
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise ConfigError(f"{what}: a registry model needs --tracking-uri (or MLFLOW_TRACKING_URI); "
                          "no registry is assumed")
    return normalize_uri(uri)


def parse_model_ref(ref: str) -> tuple[str, str, bool]:
    """``models:/name@alias`` -> (name, alias, True); ``models:/name/3`` -> (name, "3", False)."""
    body = ref[len("models:/"):]
    if "@" in body:
        name, alias = body.split("@", 1)
        return name, alias, True
    if "/" in body:
        name, version = body.split("/", 1)
        return name, version, False
    raise DataError(f"--model {ref}: expected models:/<name>@<alias> or models:/<name>/<version>")


def folder_version(export_dir: Path) -> str:
    """The version scores from a folder carry: the registry's ``name/version`` once the folder was registered
    (registered.json, for exactly this content), else the export's own ``export-<digest>``."""
    digest = str(read_manifest(export_dir)["model_version"])
    reg = export_dir / REGISTERED_FILE
    if reg.is_file():
        r = json.loads(reg.read_text())
        if r.get("model_version") == digest and r.get("name") and r.get("version"):
            return f"{r['name']}/{r['version']}"
    return digest


def _remote_folder(uri: str, root: Path) -> tuple[Path, str]:
    """An export folder on an object store (s3://...): a local copy keyed on its URI and the commit marker
    (which lists every file and size), downloaded once and checked like a registry copy before every use."""
    marker = storage.committed(uri)
    if marker is None:
        raise DataError(f"--model {uri}: not a completely published export (no valid {storage.COMMIT_MARKER})")
    identity = {"uri": uri.rstrip("/"), "files": marker["files"]}
    target = root / f"{storage.name(uri)}-{json_digest(identity, 16)}"
    if not _intact(target, identity):
        with staging_dir(target) as tmp:  # beside target: publishing it is a rename
            _install(storage.download_dir(uri, tmp / "export"), target, identity, uri)
    registered = storage.join(uri, REGISTERED_FILE)
    version = folder_version(target)
    if storage.is_file(registered):
        r = storage.read_json(registered, "registration record")
        if r.get("model_version") == read_manifest(target)["model_version"]:
            version = f"{r['name']}/{r['version']}"
    return target, version


def export_root(downloaded: Path) -> Path:
    """The export folder inside a downloaded model: itself, or the pyfunc's artifact (artifacts/<export>)."""
    if (downloaded / MANIFEST_FILE).is_file():
        return downloaded
    found = sorted(p.parent for p in downloaded.glob(f"artifacts/*/{MANIFEST_FILE}"))
    if len(found) != 1:
        raise DataError(f"{downloaded}: holds no exported model ({MANIFEST_FILE} not found at its root or under "
                        "artifacts/)")
    return found[0]


def repoint_adapters(export_dir: Path, final: Path) -> None:
    """The PEFT adapters name their base by path: point them at ``final``/base, where this copy will live."""
    for config in export_dir.glob(f"{ADAPTERS_DIR}/*/adapter_config.json"):
        c = json.loads(config.read_text())
        c["base_model_name_or_path"] = str((final / BASE_DIR).resolve())
        write_json_atomic(config, c)


def _intact(folder: Path, identity: dict) -> bool:
    try:
        recorded = json.loads((folder / IDENTITY_FILE).read_text())
        manifest = read_manifest(folder)
    except (OSError, ValueError, DataError):
        return False
    return (recorded.get("identity") == identity
            and manifest["model_version"] == f"export-{recorded.get('content_digest')}"
            and factors_digest(folder) == recorded.get("content_digest"))


def resolve_model(model: str | Path, tracking_uri: str | None = None,
                  cache_dir: str | Path | None = None) -> tuple[Path, str]:
    """(local export folder, model version) for a folder, ``models:/name@alias`` or ``models:/name/N``."""
    text = str(model)
    if storage.is_uri(text):
        return _remote_folder(text, Path(cache_dir or default_cache_dir()))
    if not text.startswith("models:/"):
        d = Path(text)
        return d, folder_version(d)
    from mlflow.exceptions import MlflowException

    uri = registry_uri(tracking_uri, f"--model {text}")
    name, ref, is_alias = parse_model_ref(text)
    client = mlflow_client(uri)
    try:
        mv = client.get_model_version_by_alias(name, ref) if is_alias else client.get_model_version(name, ref)
    except MlflowException as e:
        raise DataError(f"--model {text}: not found in the registry at {uri} ({e.message})") from e
    identity = {"registry": uri, "name": name, "version": str(mv.version), "run_id": mv.run_id,
                "source": mv.source, "created": mv.creation_timestamp}
    root = Path(cache_dir or default_cache_dir())
    target = root / f"{name.replace('/', '_')}-v{mv.version}-{json_digest(identity, 16)}"
    if not _intact(target, identity):
        import mlflow

        with staging_dir(target) as tmp:  # beside target: publishing it is a rename
            source = client.get_model_version_download_uri(name, str(mv.version))
            local = mlflow.artifacts.download_artifacts(artifact_uri=source, tracking_uri=uri, dst_path=str(tmp))
            _install(export_root(Path(local)), target, identity, f"{text} (version {mv.version})")
    return target, f"{name}/{mv.version}"


def node_reference(model: str | Path, version: str, tracking_uri: str | None = None) -> tuple[str, str | None]:
    """(reference, tracking URI) from which another machine resolves the very model that ``model`` resolved
    to here as ``version``: ``models:/<name>/<version>`` (an alias pinned to the version it named, so a
    promotion during the job changes nothing) with the registry's URI, an object-store export's URI, or a
    folder's absolute path (which other machines reach only through storage they share with this one)."""
    text = str(model)
    if text.startswith("models:/"):
        name = parse_model_ref(text)[0]
        pinned = version.rsplit("/", 1)[1] if version.startswith(f"{name}/") else None
        if not pinned:
            raise DataError(f"--model {text}: resolved to {version!r}, not a version of {name}")
        return f"models:/{name}/{pinned}", registry_uri(tracking_uri, f"--model {text}")
    if storage.is_uri(text):
        return text, None
    return str(Path(text).resolve()), None


def _install(local: Path, target: Path, identity: dict, what: str) -> None:
    """Check a downloaded export's factors against its manifest's model version, point its adapters at
    ``target`` and publish it there whole (a stale or damaged copy is replaced; a copy another process
    finished first is kept)."""
    digest = factors_digest(local)
    if read_manifest(local)["model_version"] != f"export-{digest}":
        raise DataError(f"{what}: factors do not match the manifest's model_version (a damaged or altered export)")
    repoint_adapters(local, target)
    write_json_atomic(local / IDENTITY_FILE, {"identity": identity, "content_digest": digest})
    if not target.exists():
        # Another process (a second Ray actor on this node, say) may publish the same copy first: then its copy
        # stays and this one is dropped. Replacing it would take the folder away while that process reads it.
        publish_dir(local, target, replace=False)
    elif not _intact(target, identity):
        publish_dir(local, target)  # a stale or damaged copy: replaced
