"""What the run learns about its teacher at each evaluation: the weighted k-NN top-1 on the run's
labelled images (the paper's protocol: evaluation/knn.py) and the attention maps (TensorBoard, W&B).
The main process evaluates; the others wait at a barrier."""

from __future__ import annotations

from torch import nn

from dinolab.data.datasets import Sources
from dinolab.data.transforms import EvalTransform
from dinolab.distributed import barrier
from dinolab.evaluation.features import extract_features, fixed_subset
from dinolab.evaluation.knn import knn_accuracy
from dinolab.training.monitor import Metrics
from dinolab.training.state import TrainingState, evaluation_backbone
from dinolab.visualization.monitor import log_attention_maps


def look_at_teacher(state: TrainingState, sources: Sources, transform: EvalTransform,
                    metrics: Metrics) -> float | None:
    """The teacher's weighted k-NN top-1 (%), None when the data has no labels, and its
    attention maps (TensorBoard, W&B). The main process does both; the others wait."""
    backbone = evaluation_backbone(state)  # a collective when sharded
    result = None
    if backbone is not None:  # the main process
        result = knn_monitor(state, backbone, sources, transform)
        log_attention_maps(metrics, backbone, sources, transform, state.step)
    barrier()
    return result


def knn_monitor(state: TrainingState, backbone: nn.Module, sources: Sources,
                transform: EvalTransform) -> float | None:
    """Weighted k-NN top-1 (%) of the teacher backbone; None when the data has no labels."""
    if sources.knn_train is None or sources.knn_test is None:
        return None
    config = state.config
    train = fixed_subset(sources.knn_train, config.eval.knn_train_limit)
    test = fixed_subset(sources.knn_test, config.eval.knn_test_limit)
    arguments = (transform, state.device, config.eval.batch_size, config.data.num_workers,
                 state.autocast_dtype)
    train_features, train_labels = extract_features(backbone, train, *arguments)
    test_features, test_labels = extract_features(backbone, test, *arguments)
    accuracy = knn_accuracy(train_features, train_labels, test_features, test_labels,
                            config.eval.knn_k, config.eval.knn_temperature)
    return accuracy["top1"]
