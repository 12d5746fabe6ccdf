"""The classical baselines: scikit-learn models on per-channel summary statistics of each image.

Ten numbers per tile (the mean and spread of each band) often do as well as a network on small
labelled sets; a sweep that leaves them out cannot say whether a network is worth it.
"""
from __future__ import annotations

import numpy as np

PERCENTILES = (5, 25, 50, 75, 95)
STATISTICS = ("mean", "std", *(f"p{q}" for q in PERCENTILES))


def channel_statistics(image: np.ndarray) -> np.ndarray:
    """float [C, H, W] (NaN at nodata) -> [C x 7]: per channel mean, std and the 5/25/50/75/95th
    percentiles of its valid values (NaN for a channel without one), channel-major."""
    flat = image.reshape(image.shape[0], -1).astype(np.float64)
    valid = ~np.isnan(flat)
    out = np.full((flat.shape[0], len(STATISTICS)), np.nan)
    for c in range(flat.shape[0]):
        v = flat[c, valid[c]]
        if v.size:
            out[c] = [v.mean(), v.std(), *np.percentile(v, PERCENTILES)]
    return out.ravel()


def feature_names(channels: list[str]) -> list[str]:
    return [f"{c}_{s}" for c in channels for s in STATISTICS]


def make_estimator(name: str, seed: int):
    """A scikit-learn pipeline: median imputation (a channel with no valid pixel), then
    standardised logistic regression (lbfgs, multinomial) or a 300-tree random forest. Neither is
    class-weighted, as the networks' cross-entropy is not. ValueError for an unknown name."""
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.impute import SimpleImputer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    impute = SimpleImputer(strategy="median", keep_empty_features=True)
    if name == "logistic_regression":
        return make_pipeline(impute, StandardScaler(), LogisticRegression(max_iter=5000))
    if name == "random_forest":
        return make_pipeline(impute, RandomForestClassifier(n_estimators=300, random_state=seed, n_jobs=1))
    raise ValueError(f"unknown classical baseline {name!r}; known: logistic_regression, random_forest")


def fit_predict(name: str, seed: int, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
                num_classes: int) -> np.ndarray:
    """-> class probabilities [N_test, num_classes] (0 for a class absent from training)."""
    model = make_estimator(name, seed).fit(x_train, y_train)
    probs = np.zeros((len(x_test), num_classes))
    probs[:, model.classes_.astype(int)] = model.predict_proba(x_test)
    return probs
