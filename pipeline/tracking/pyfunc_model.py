"""The registered model (logged *from code*, never cloudpickled).

predict() takes raw, unnormalised images [N, C, H, W] (or one [C, H, W]) in the units the data
came in, applies the saved channel statistics and the evaluation resize itself, and returns a table
by task (tracking/outputs.py): multi-class, one probability column per class name (rows sum to 1);
multi-label, one probability column per label and the predicted label sets. Its input checks
run before anything else: a wrong channel count, rank or dtype is refused with a message saying
what was expected (the signature leaves C open so that this message, not a dump of the input, is
what a caller sees).
"""
from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel


class MimflowClassifier(PythonModel):
    def load_context(self, context) -> None:
        import torch

        from pipeline.data.stats import Normalizer
        from pipeline.data.transforms import eval_transform
        from pipeline.tracking.outputs import model_outputs
        from pipeline.weights import load_classifier

        self.model, self.meta = load_classifier(context.artifacts["classifier"])  # eval mode
        self.normalize = Normalizer(self.meta["stats"])
        self.resize = eval_transform(self.meta["img_size"])  # exactly what `evaluate` applies
        self.torch, self.outputs = torch, model_outputs

    def _validate(self, x) -> np.ndarray:
        m = self.meta
        if hasattr(x, "to_numpy"):  # a DataFrame from a generic client
            x = x.to_numpy()
        x = np.asarray(x)
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or x.shape[1] != m["in_chans"]:
            raise ValueError(f"expected images of shape [N, {m['in_chans']}, H, W] "
                             f"(channels {m['channels']}), got {tuple(x.shape)}")
        if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
            raise ValueError(f"expected a numeric image array, got dtype {x.dtype}")
        return x.astype(np.float32)

    def predict(self, context, model_input: np.ndarray, params: dict | None = None) -> pd.DataFrame:
        """model_input: raw images [N, C, H, W] or [C, H, W], any numeric dtype, any H, W ->
        probabilities [N, K] as a DataFrame whose columns are the class (label) names, and for a
        multi-label classifier the predicted label sets (tracking/outputs.py)."""
        x = self.normalize(self._validate(model_input))  # [N, C, H, W]
        if x.shape[2:] != (self.meta["img_size"],) * 2:
            x = np.stack([self.resize(image=i.transpose(1, 2, 0))["image"].transpose(2, 0, 1) for i in x])
        with self.torch.no_grad():
            logits = self.model(self.torch.from_numpy(x))
        return self.outputs(logits, self.meta)


mlflow.models.set_model(MimflowClassifier())
