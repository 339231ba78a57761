"""Held-out evaluation: confusion matrix and per-label metrics against scikit-learn, groups, old fields kept."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

from fedtune.common.tasks.classify.evaluation import confusion_of, evaluate, label_metrics


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_confusion_and_label_metrics_match_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    y_true, y_pred = rng.integers(0, 3, 200), rng.integers(0, 3, 200)
    cm = confusion_of(y_true, y_pred, 3)
    assert cm == confusion_matrix(y_true, y_pred, labels=[0, 1, 2]).tolist()
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=[0, 1, 2],
                                                                     zero_division=np.nan)
    metrics = label_metrics(cm)
    assert len(metrics) == 3
    for i, m in enumerate(metrics):
        assert m.precision == pytest.approx(precision[i]) and m.recall == pytest.approx(recall[i])
        assert m.f1 == pytest.approx(f1[i]) and m.support == support[i]


def test_a_label_never_predicted_has_undefined_precision_not_zero():
    metrics = label_metrics(confusion_of(np.array([0, 0, 1, 1]), np.array([0, 0, 0, 0]), 2))
    assert math.isnan(metrics[1].precision) and metrics[1].recall == 0.0 and metrics[1].support == 2
    assert metrics[0].recall == 1.0 and metrics[0].precision == 0.5


class _Fixed(torch.nn.Module):
    """Predicts class 1 exactly where the first token id is odd."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        odd = (input_ids[:, 0] % 2).float()
        return torch.stack([1 - odd, odd], dim=-1) * 4.0


def test_evaluate_returns_confusion_per_group_and_keeps_its_fields():
    ids = torch.tensor([[1, 5], [2, 5], [3, 5], [4, 5], [5, 5], [6, 5]])
    mask = torch.ones_like(ids)
    labels = torch.tensor([1, 0, 0, 0, 1, 1])  # predictions: 1 0 1 0 1 0
    result = evaluate(_Fixed(), ids, mask, labels, device=torch.device("cpu"), batch_size=4,
                      groups=["a", "a", "b", "b", "c", "c"])
    assert result.num_examples == 6 and result.accuracy == pytest.approx(4 / 6) and result.loss > 0
    assert result.confusion == [[2, 1], [1, 2]]
    assert result.group_confusion == {"a": [[1, 0], [0, 1]], "b": [[1, 1], [0, 0]], "c": [[0, 0], [1, 1]]}
    assert evaluate(_Fixed(), ids, mask, labels, device=torch.device("cpu")).group_confusion == {}


def test_evaluate_runs_shortest_first_but_reports_in_the_examples_order():
    ids = torch.tensor([[1, 5, 5], [2, 0, 0], [3, 5, 0], [4, 0, 0], [5, 5, 5], [6, 5, 0]])
    mask = (ids != 0).long()
    labels = torch.tensor([1, 0, 1, 1, 0, 0])  # predictions: 1 0 1 0 1 0
    result = evaluate(_Fixed(), ids, mask, labels, device=torch.device("cpu"), batch_size=2,
                      groups=["a", "b", "a", "b", "c", "c"])
    assert result.confusion == [[2, 1], [1, 2]]
    assert result.group_confusion == {"a": [[0, 0], [0, 2]], "b": [[1, 0], [1, 0]], "c": [[1, 1], [0, 0]]}
