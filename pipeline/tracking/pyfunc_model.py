"""The registered model (logged *from code*, never cloudpickled).

predict() takes raw, unnormalised images [N, C, H, W] (or one [C, H, W]) in the units the data
came in, applies the saved channel statistics and the evaluation resize itself and returns class
probabilities [N, K]; a multi-label classifier returns per-label probabilities and the predicted
label sets (tracking/outputs.py).
"""
from __future__ import annotations

import warnings

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel

# Shapes and dtypes are checked against the logged TensorSpec signature and by _validate below;
# MLflow's type-hint validation does not describe [N, C, H, W] tensors.
warnings.filterwarnings("ignore", message=".*Add type hints to the `predict` method")


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

    def predict(self, context, model_input, params=None) -> np.ndarray:
        x = self.normalize(self._validate(model_input))  # [N, C, H, W]
        if x.shape[2:] != (self.meta["img_size"],) * 2:
            x = np.stack([self.resize(image=i.transpose(1, 2, 0))["image"].transpose(2, 0, 1) for i in x])
        with self.torch.no_grad():
            logits = self.model(self.torch.from_numpy(x))
        return self.outputs(logits, self.meta)  # by task: probabilities [N, K], or labels' probabilities + sets


mlflow.models.set_model(MimflowClassifier())
