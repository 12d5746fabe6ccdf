"""The MLflow model registry: a classifier logged as a pyfunc model *from code* (never
cloudpickled), registered as a new version with lineage tags and an alias."""
from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
from mlflow.entities import LoggedModelInput, LoggedModelOutput
from mlflow.models import ModelSignature
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline import faults

PACKAGE_DIR = Path(__file__).resolve().parents[1]
PYFUNC_CODE = PACKAGE_DIR / "tracking" / "pyfunc_model.py"


KEY_TAG = "mimflow.classifier_sha256"  # which weights a version holds: the registration's identity


class SchemaChangeError(ValueError):
    """A new version would change what the registered model takes or returns; the message names it."""


SCHEMA_TAG = "mimflow.schema"  # classes, channels and input size of a version, as JSON


def register_classifier(classifier_dir: Path, name: str, alias: str, signature: ModelSignature,
                        input_example: np.ndarray, tags: dict, metadata: dict, weights_sha256: str,
                        schema: dict, allow_schema_change: bool = False, description: str | None = None,
                        linked_runs: dict | None = None) -> str:
    """Log `classifier_dir` as a pyfunc model in the active MLflow run, register it as a version
    of `name` created with its tags and description, and point `alias` at it -> the version number.

    Safe to repeat: a version already holding these weights (same sha256; e.g. created by a run
    killed before it set the alias) is completed and reused, never duplicated. A version whose
    classes, channels or input size (`schema`) differ from the model's latest version is refused
    with SchemaChangeError unless allow_schema_change: an alias would otherwise move to a model
    its callers cannot use. linked_runs: {"output": run id that made it, "input": run id that
    scored it}: the logged model shows in those runs' Models columns.
    """
    client = MlflowClient()
    check_schema(client, name, schema, allow_schema_change)
    tags = {**{k: str(v) for k, v in tags.items()}, KEY_TAG: weights_sha256,
            SCHEMA_TAG: json.dumps(schema, sort_keys=True)}
    existing = existing_version(client, name, weights_sha256)
    if existing is None:
        info = mlflow.pyfunc.log_model(
            name="model", python_model=str(PYFUNC_CODE), artifacts={"classifier": str(classifier_dir)},
            code_paths=[str(PACKAGE_DIR)], signature=signature, input_example=input_example, metadata=metadata,
            pip_requirements=pip_requirements())
        with _quiet_when_asked():  # MLflow prints "Successfully registered ..." itself
            version = str(mlflow.register_model(info.model_uri, name, tags=tags).version)  # tags in the same call
        faults.inject("register", 1)  # tests: killed here, the version exists without its alias
        _link(client, info.model_id, linked_runs or {})
    else:
        version = existing
        print(f"register: version {version} of {name!r} already holds these weights; completing it, "
              "not registering a duplicate", flush=True)
        for key, value in tags.items():
            client.set_model_version_tag(name, version, key, value)
    if description:
        client.update_model_version(name, version, description=description)
    client.set_registered_model_alias(name, alias, version)
    return version


def _quiet_when_asked():
    """Silence MLflow's own prints under run.quiet (MLflow's logger then stands at WARNING)."""
    import contextlib
    import io
    import logging

    if logging.getLogger("mlflow").getEffectiveLevel() >= logging.WARNING:
        return contextlib.redirect_stderr(io.StringIO())
    return contextlib.nullcontext()


def check_schema(client: MlflowClient, name: str, schema: dict, allowed: bool) -> None:
    """Refuse a version whose schema differs from the latest version's (see register_classifier)."""
    try:
        versions = client.search_model_versions(f"name='{name}'")
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return
        raise
    tagged = [v for v in versions if SCHEMA_TAG in v.tags]
    if not tagged or allowed:
        return
    latest = max(tagged, key=lambda v: int(v.version))
    before = json.loads(latest.tags[SCHEMA_TAG])
    diff = [f"{k}: {before.get(k)} -> {schema.get(k)}" for k in sorted(set(before) | set(schema))
            if before.get(k) != schema.get(k)]
    if diff:
        raise SchemaChangeError(f"model {name!r} version {latest.version} takes or returns something else "
                                f"({'; '.join(diff)}): not registered as a new version of it; give another "
                                "register.model_name, or register.allow_schema_change=true")


def _link(client: MlflowClient, model_id: str | None, runs: dict) -> None:
    """Show the logged model in the runs that made and scored it (MLflow 3's run-model links)."""
    if not model_id:
        return
    for role, run_id in runs.items():
        if not run_id:
            continue
        try:
            client.get_run(run_id)
        except MlflowException as err:
            if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            # A classifier trained against another store (or a deleted run): its lineage tags still
            # name the run; only the clickable link cannot be drawn here.
            print(f"register: run {run_id} is not in this tracking store; the model is not linked to it "
                  "(its id stays in the version's tags)", flush=True)
            continue
        if role == "output":
            client.log_outputs(run_id, [LoggedModelOutput(model_id, step=0)])
        else:
            client.log_inputs(run_id, models=[LoggedModelInput(model_id)])


def pip_requirements() -> list[str]:
    """mimflow's own runtime dependencies, pinned to the installed versions. Given explicitly,
    MLflow need not infer them by loading the model in a subprocess (~20 s per registration)."""
    from importlib.metadata import PackageNotFoundError, requires, version

    from packaging.requirements import Requirement

    out = []
    for text in requires("mimflow") or []:
        req = Requirement(text)
        if req.marker is not None and "extra" in str(req.marker):
            continue
        try:
            out.append(f"{req.name}=={version(req.name)}")
        except PackageNotFoundError:
            out.append(str(req))
    return out


def existing_version(client: MlflowClient, name: str, weights_sha256: str) -> str | None:
    """The newest version of `name` registered with these weights, or None."""
    try:
        versions = client.search_model_versions(f"name='{name}'")
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    hits = [v for v in versions if v.tags.get(KEY_TAG) == weights_sha256]
    return str(max(int(v.version) for v in hits)) if hits else None
