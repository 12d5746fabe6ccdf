"""What the registered model returns for each task, and the signature and tags that say so.

multiclass: a pandas DataFrame with one row per image and a float32 column per class (its softmax
    probability, named as the class; rows sum to 1), in meta["classes"] order.
multilabel: a pandas DataFrame with one row per image: a float32 column per label (its sigmoid
    probability, named as the label) and PREDICTED, the list of labels whose probability reaches
    the label's threshold (meta["thresholds"], chosen on the val split by fine-tuning).
"""
from __future__ import annotations

import json

import numpy as np
import torch
from mlflow.types.schema import Array, ColSpec, DataType, Schema

from pipeline.metrics import probabilities

PREDICTED = "predicted_labels"


def model_outputs(logits: torch.Tensor, meta: dict):
    """logits [N, K] -> what predict() returns for meta["task"] (see the module docstring)."""
    import pandas as pd

    task = meta.get("task", "multiclass")
    probs = probabilities(logits, task).astype(np.float32)  # [N, K]
    if task != "multilabel":
        return pd.DataFrame(probs, columns=meta["classes"])
    labels = meta["classes"]
    chosen = probs >= np.asarray(meta["thresholds"], np.float32)[None]  # [N, K] bool
    out = pd.DataFrame({name: probs[:, k] for k, name in enumerate(labels)})
    out[PREDICTED] = [[labels[k] for k in np.flatnonzero(row)] for row in chosen]
    return out


def output_schema(meta: dict) -> Schema:
    """The signature's outputs for meta["task"]. ValueError when a label is named PREDICTED."""
    if meta.get("task", "multiclass") != "multilabel":
        return Schema([ColSpec(DataType.float, name) for name in meta["classes"]])
    if PREDICTED in meta["classes"]:
        raise ValueError(f"a label is named {PREDICTED!r}, the output column of the predicted label sets")
    return Schema([ColSpec(DataType.float, name) for name in meta["classes"]]
                  + [ColSpec(Array(DataType.string), PREDICTED)])


def task_metadata(meta: dict) -> dict:
    """The task, and for a multi-label classifier its labels (in output order) and each label's
    threshold: model metadata as they are, model-version tags as JSON (task_tags)."""
    out = {"task": meta.get("task", "multiclass")}
    if out["task"] == "multilabel":
        out.update(labels=meta["classes"], thresholds=dict(zip(meta["classes"], meta["thresholds"])))
    return out


def task_tags(meta: dict) -> dict[str, str]:
    """task_metadata as model-version tags (strings; lists and dicts as JSON)."""
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in task_metadata(meta).items()}
