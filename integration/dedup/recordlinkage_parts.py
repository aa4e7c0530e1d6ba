"""The parts of the linkage that subclass recordlinkage's own, in a module of their own.

Importing recordlinkage (and scikit-learn with it) costs more than a second; ``integration.dedup.linkage``
imports this module only when it links, so a run or a command that links nothing does not pay it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from recordlinkage.algorithms.nb_sklearn import ECM, safe_sparse_dot
from recordlinkage.base import BaseCompareFeature
from scipy.sparse import issparse
from sklearn.utils.validation import check_array

from integration.dedup.linkage import Method, _distinct_rows, _texts, similarity_levels


class SimilarityLevels(BaseCompareFeature):  # type: ignore[misc]
    """A recordlinkage compare feature: rapidfuzz similarity of two columns, as a level 0..len(levels).

    Missing values on either side give level 0 (no evidence of agreement).
    """

    def __init__(self, left: str, right: str, method: Method, levels: Sequence[float], label: str) -> None:
        super().__init__(left, right, label=label)
        self.method = method
        self.levels = tuple(sorted(levels, reverse=True))

    def _compute_vectorized(self, s_left: pd.Series, s_right: pd.Series) -> pd.Series:
        level = similarity_levels(self.method, self.levels, _texts(s_left), _texts(s_right))
        return pd.Series(level, index=s_left.index)


class PackedECM(ECM):  # type: ignore[misc]
    """recordlinkage's ECM kernel, counting the distinct comparison vectors by packing each binary row into one
    integer instead of ``np.unique(X, axis=0)``, which sorts rows as records (half a minute at two million
    pairs on a slow machine). The distinct rows come out in the same order with the same counts, and the
    expectation/conditional maximisation below is recordlinkage 0.16's ``ECM.fit`` step for step, so the
    fitted model and every probability are the same.
    """

    def fit(self, X: Any) -> PackedECM:
        """Fit on ``X`` (binary comparison vectors); other input takes the library's own fit."""
        X = check_array(X, accept_sparse="csr")
        if issparse(X) or not 0 < X.shape[1] <= 62 or not ((X == 0) | (X == 1)).all():
            super().fit(X)
            return self
        X_unique, X_freq = _distinct_rows(X)
        X_freq = np.atleast_2d(X_freq)
        X_unique_bin = self._fit_data(X_unique)
        self.classes_ = np.array([0, 1])
        if self.init == "random":
            self.class_log_prior_, self.feature_log_prob_ = self._init_parameters_random(X_unique_bin)
        elif self.init == "jaro":
            self.class_log_prior_, self.feature_log_prob_ = self._init_parameters_jaro(X_unique_bin)
        else:
            raise ValueError(f"'{self.init}' is not a valid value for argument 'init'")
        iteration = 0
        while iteration < self.max_iter:
            iteration += 1
            g = self.predict_proba(X_unique)  # expectation
            g_freq = g * X_freq.T
            g_freq_sum = g_freq.sum(axis=0)
            class_log_prior_ = np.log(g_freq_sum) - np.log(X.shape[0])  # maximisation
            feature_log_prob_ = np.log(safe_sparse_dot(g_freq.T, X_unique_bin))
            feature_log_prob_ -= np.log(np.atleast_2d(g_freq_sum).T)
            converged = (
                self.atol is not None
                and np.allclose(np.exp(class_log_prior_), np.exp(self.class_log_prior_), atol=self.atol)
                and np.allclose(np.exp(feature_log_prob_), np.exp(self.feature_log_prob_), atol=self.atol)
            )
            if np.all(np.isnan(feature_log_prob_)):
                break
            self.class_log_prior_ = class_log_prior_
            self.feature_log_prob_ = feature_log_prob_
            if converged:
                break
        return self
