"""The official GLUE metrics, computed with scikit-learn and scipy.

=================================  ===================================================
task                               metrics
=================================  ===================================================
CoLA                               ``mcc``: Matthews correlation
SST-2, MNLI, QNLI, RTE, WNLI       ``accuracy``
MRPC, QQP                          ``accuracy`` and ``f1`` (of the positive class, 1)
STS-B                              ``pearson`` and ``spearman`` correlation
=================================  ===================================================
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from data.glue import GlueTask, get_task


def _as_array(values) -> np.ndarray:
    if hasattr(values, "detach"):  # a torch tensor
        values = values.detach().cpu().numpy()
    return np.asarray(values)


def glue_metrics(task: GlueTask | str, predictions, labels) -> Mapping[str, float]:
    """The task's metrics of ``predictions`` against gold ``labels``.

    ``predictions``: class ids [n], or logits [n, num_labels] (their argmax is taken); for STS-B
    scores [n] or [n, 1]. ``labels``: class ids [n] (scores for STS-B). Arrays, lists or tensors.
    """
    task = get_task(task) if isinstance(task, str) else task
    pred = _as_array(predictions)
    gold = _as_array(labels).reshape(-1)
    if task.is_regression:
        pred = pred.reshape(-1).astype(np.float64)
    elif pred.ndim == 2:
        pred = pred.argmax(axis=1)
    if pred.shape != gold.shape:
        raise ValueError(f"{task.dir_name}: {pred.shape[0]} predictions for {gold.shape[0]} "
                         "labels")
    if gold.size == 0:
        raise ValueError(f"{task.dir_name}: no labels to score")
    out: dict[str, float] = {}
    for metric in task.metrics:
        if metric == "mcc":
            out[metric] = float(matthews_corrcoef(gold, pred))
        elif metric == "accuracy":
            out[metric] = float(accuracy_score(gold, pred))
        elif metric == "f1":
            out[metric] = float(f1_score(gold, pred, pos_label=1, average="binary"))
        elif metric == "pearson":
            out[metric] = float(pearsonr(pred, gold.astype(np.float64))[0])
        elif metric == "spearman":
            out[metric] = float(spearmanr(pred, gold.astype(np.float64))[0])
        else:  # pragma: no cover - GlueTask.metrics only names the ones above
            raise ValueError(f"unknown metric {metric!r}")
    return out
