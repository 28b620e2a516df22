"""The PCA of the 64-d DL feature (Figure 5e)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from covidct.io.results import feature_columns


def feature_pca(predictions: pd.DataFrame, n_components: int = 2
                ) -> tuple[pd.DataFrame, np.ndarray]:
    """PCA of the z-scored DL features: ``(coordinates frame, explained variance ratios)``."""
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    feats = feature_columns(predictions)
    if len(predictions) < n_components or len(feats) < n_components:
        raise ValueError(f"PCA needs at least {n_components} patients and features "
                         f"(got {len(predictions)} and {len(feats)})")
    z = StandardScaler().fit_transform(predictions[feats].to_numpy(float))
    pca = PCA(n_components=n_components, random_state=0)
    coords = pca.fit_transform(z)
    out = predictions[["site", "patient", "y"]].reset_index(drop=True).copy()
    for i in range(n_components):
        out[f"pc{i + 1}"] = coords[:, i]
    return out, pca.explained_variance_ratio_
