"""Comparing two trainings' weights: shared by the accumulation, DDP, crash-safety and Slurm
tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def prefixed(prefix: str) -> Callable[[str], str]:
    """assert_close's ``msg``: keep its numbers (mismatches, greatest difference)."""
    return lambda message: f"{prefix}: {message}"


def assert_tensors_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
                         what: str, tolerance: dict[str, float]) -> None:
    assert actual.keys() == expected.keys(), what
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], **tolerance,
                                   msg=prefixed(f"{what}: {key}"))


def split_key_bias(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor],
                                                            dict[str, torch.Tensor]]:
    """Separate the key third of every ``qkv.bias`` ([3 * D], rows q, k, v) from the rest.

    The key bias's true gradient is zero (softmax is invariant to it), so Adam turns rounding
    noise into moves of up to lr per step: it is compared with its own, wider tolerance.
    """
    rest, key_bias = {}, {}
    for name, value in state.items():
        if name.endswith("attn.qkv.bias"):
            query, key, value_part = value.chunk(3)
            rest[f"{name}[q]"], key_bias[f"{name}[k]"], rest[f"{name}[v]"] = query, key, value_part
        else:
            rest[name] = value
    return rest, key_bias


def assert_networks_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
                          what: str, tolerance: dict[str, float],
                          key_bias_tolerance: dict[str, float]) -> None:
    actual_rest, actual_key_bias = split_key_bias(actual)
    expected_rest, expected_key_bias = split_key_bias(expected)
    assert expected_key_bias, "the backbone has no qkv bias: update split_key_bias"
    assert_tensors_close(actual_rest, expected_rest, what, tolerance)
    assert_tensors_close(actual_key_bias, expected_key_bias, what, key_bias_tolerance)


def assert_same_networks(actual: dict[str, Any], expected: dict[str, Any]) -> None:
    """Two checkpoints at the same epoch and step with bit-identical student, teacher and
    center."""
    assert (actual["epoch"], actual["step"]) == (expected["epoch"], expected["step"])
    for part in ("student", "teacher", "loss"):  # "loss" holds the center
        different = [key for key in expected[part]
                     if not torch.equal(actual[part][key], expected[part][key])]
        assert not different, f"{part} differs: {different[:3]}"
