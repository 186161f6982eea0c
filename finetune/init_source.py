"""Where a fine-tuning run starts: a model-package folder, `runs:/<run_id>/model` or `models:/<name>/<version>`.

`resolve_init` turns the source into a local package folder (downloading MLflow artifacts into the
run's output) and finds the run that produced it, so the fine-tuning run can name its parent:
the run id of a `runs:/` URI, the run of a registered version, or the `run_id` a package's
package.json records.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from pretrain.package import INFO_FILE, PackageError, read_package_info

log = logging.getLogger(__name__)

RUNS_URI = re.compile(r"^runs:/(?P<run_id>[^/]+)/(?P<path>.+)$")
MODELS_URI = re.compile(r"^models:/(?P<name>[^/]+)/(?P<version>[^/]+)$")


class InitSourceError(ValueError):
    """The init source does not exist or holds no model package."""


@dataclass
class InitSource:
    uri: str  # as given
    directory: Path  # the local model package
    parent_run_id: str | None  # the run that produced the weights, when known
    registered: str | None = None  # "name/version" for a models:/ source


def resolve_init(source: str, download_to: Path, tracking_uri: str | None = None) -> InitSource:
    """The local package of `source`; MLflow sources are downloaded under `download_to`."""
    if match := RUNS_URI.match(source):
        return _from_run(source, match["run_id"], match["path"], download_to, tracking_uri)
    if match := MODELS_URI.match(source):
        return _from_registry(source, match["name"], match["version"], download_to, tracking_uri)
    if "://" in source or source.startswith(("runs:", "models:")):
        raise InitSourceError(f"init source {source!r} is neither a folder nor runs:/<run_id>/<path> nor "
                              "models:/<name>/<version>")
    directory = Path(source)
    _check_package(directory, source)
    return InitSource(source, directory, read_package_info(directory).run_id)


def _client(tracking_uri: str | None):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def _from_run(source: str, run_id: str, path: str, download_to: Path, tracking_uri: str | None) -> InitSource:
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    try:
        client.get_run(run_id)
    except MlflowException as exc:
        raise InitSourceError(f"init source {source}: no run {run_id!r} in the tracking store "
                              f"{client.tracking_uri} ({exc.error_code}); check MLFLOW_TRACKING_URI and the run id "
                              "(`mlflow runs list` or the MLflow UI)") from None
    directory = _download(source, download_to, tracking_uri)
    _check_package(directory, source)
    return InitSource(source, directory, run_id)


def _from_registry(source: str, name: str, version: str, download_to: Path, tracking_uri: str | None) -> InitSource:
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    try:
        record = client.get_model_version(name, version)
    except MlflowException as exc:
        raise InitSourceError(f"init source {source}: registered model {name!r} has no version {version!r} in "
                              f"{client.tracking_uri} ({exc.error_code}); list them with "
                              f"MlflowClient().search_model_versions(\"name='{name}'\")") from None
    directory = _download(record.source, download_to, tracking_uri)
    _check_package(directory, source)
    return InitSource(source, directory, record.run_id, registered=f"{name}/{version}")


def _download(uri: str, download_to: Path, tracking_uri: str | None) -> Path:
    import mlflow

    download_to.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s", uri)
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(download_to),
                                                    tracking_uri=tracking_uri))


def _check_package(directory: Path, source: str) -> None:
    if not directory.is_dir():
        raise InitSourceError(f"init source {source}: folder {directory} does not exist; give a model package "
                              "folder (it holds package.json, model.safetensors, config.yaml, tokenizer/), "
                              "runs:/<run_id>/model or models:/<name>/<version>")
    if not (directory / INFO_FILE).is_file():
        raise InitSourceError(f"init source {source}: {directory} holds no {INFO_FILE}, so it is not a model "
                              "package; pretraining writes one under OUTPUT/package and logs it as the run's model/")
    try:
        read_package_info(directory)
    except PackageError as exc:
        raise InitSourceError(f"init source {source}: {exc}") from None
