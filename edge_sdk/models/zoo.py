"""Small ONNX models built in code, for examples, the simulator and the demo.

The models are plain inference graphs (opset 17) with PyTorch-style weight
names (``fc1.weight`` of shape (out, in) used by ``Gemm`` with ``transB=1``,
``conv1.weight`` of shape (out, in, kh, kw)) and PyTorch's default
initialisation (uniform in +-1/sqrt(fan_in)), drawn from a numpy Generator
seeded by ``seed``. Their outputs are logits: train them with
``loss="softmax_cross_entropy"``.

:func:`load_digits` returns scikit-learn's bundled 8x8 digits (1,797 images,
no download); scikit-learn is in the ``sim`` extra, not the device install.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
from numpy.typing import NDArray
from onnx import helper, numpy_helper

__all__ = ["OPSET", "digits_cnn", "digits_mlp", "load_digits", "mlp"]

#: Opset of the models built here.
OPSET = 17
_IR_VERSION = 8

_ACTIVATIONS = ("relu", "tanh", "sigmoid", "leaky_relu")


def _uniform(rng: np.random.Generator, shape: Sequence[int], fan_in: int) -> NDArray[Any]:
    bound = 1.0 / math.sqrt(fan_in)
    return rng.uniform(-bound, bound, size=tuple(shape))


def _finish(
    nodes: list[onnx.NodeProto],
    inits: list[onnx.TensorProto],
    inp: onnx.ValueInfoProto,
    out: onnx.ValueInfoProto,
    name: str,
) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, [inp], [out], initializer=inits)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="edgefl.zoo"
    )
    model.ir_version = _IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


def mlp(
    n_features: int,
    hidden: int | Sequence[int],
    n_classes: int,
    *,
    seed: int = 0,
    activation: str = "relu",
    dtype: type[np.floating[Any]] = np.float32,
) -> onnx.ModelProto:
    """Build a fully connected network ``input (N, n_features) -> logits (N, n_classes)``.

    Args:
        n_features: input width.
        hidden: width of each hidden layer (an int for one layer, () for none).
        n_classes: output width.
        seed: seeds the initial weights.
        activation: ``relu``, ``tanh``, ``sigmoid`` or ``leaky_relu``.
        dtype: ``np.float32`` (default) or ``np.float64`` (for gradient checks).

    Returns:
        A checked inference model with layers ``fc1``, ``fc2``, ...
    """
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {_ACTIVATIONS}. Found {activation!r}")
    widths = [hidden] if isinstance(hidden, int) else list(hidden)
    sizes = [n_features, *widths, n_classes]
    if any(s < 1 for s in sizes):
        raise ValueError(f"layer widths must be >= 1. Found {sizes}")
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    current = "input"
    for i in range(len(sizes) - 1):
        fan_in, fan_out = sizes[i], sizes[i + 1]
        w_name, b_name = f"fc{i + 1}.weight", f"fc{i + 1}.bias"
        inits.append(
            numpy_helper.from_array(_uniform(rng, (fan_out, fan_in), fan_in).astype(dtype), w_name)
        )
        inits.append(
            numpy_helper.from_array(_uniform(rng, (fan_out,), fan_in).astype(dtype), b_name)
        )
        last = i == len(sizes) - 2
        out = "logits" if last else f"fc{i + 1}"
        nodes.append(
            helper.make_node("Gemm", [current, w_name, b_name], [out], name=f"fc{i + 1}", transB=1)
        )
        current = out
        if not last:
            act = f"act{i + 1}"
            op = {"relu": "Relu", "tanh": "Tanh", "sigmoid": "Sigmoid", "leaky_relu": "LeakyRelu"}
            nodes.append(helper.make_node(op[activation], [current], [act], name=act))
            current = act
    inp = helper.make_tensor_value_info("input", elem, ["N", n_features])
    out_vi = helper.make_tensor_value_info("logits", elem, ["N", n_classes])
    return _finish(nodes, inits, inp, out_vi, "edgefl_mlp")


def digits_mlp(hidden: int = 64, seed: int = 0) -> onnx.ModelProto:
    """The digits MLP: 64 pixels -> ``hidden`` ReLU units -> 10 logits (4,810 weights at 64)."""
    return mlp(64, hidden, 10, seed=seed)


def digits_cnn(
    channels: tuple[int, int] = (8, 16),
    seed: int = 0,
    *,
    dtype: type[np.floating[Any]] = np.float32,
) -> onnx.ModelProto:
    """A small CNN for 8x8 digits: input (N, 1, 8, 8) -> logits (N, 10).

    Layers: Conv 3x3 pad 1 -> Relu -> MaxPool 2x2 -> Conv 3x3 pad 1 -> Relu ->
    AveragePool 2x2 -> Flatten -> Gemm. With the default channels it has
    1,898 weights.

    Args:
        channels: output channels of the two convolutions.
        seed: seeds the initial weights.
        dtype: ``np.float32`` (default) or ``np.float64``.
    """
    c1, c2 = channels
    if c1 < 1 or c2 < 1:
        raise ValueError(f"channels must be >= 1. Found {channels}")
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    rng = np.random.default_rng(seed)

    def arr(shape: Sequence[int], fan_in: int, name: str) -> onnx.TensorProto:
        return numpy_helper.from_array(_uniform(rng, shape, fan_in).astype(dtype), name)

    inits = [
        arr((c1, 1, 3, 3), 9, "conv1.weight"),
        arr((c1,), 9, "conv1.bias"),
        arr((c2, c1, 3, 3), 9 * c1, "conv2.weight"),
        arr((c2,), 9 * c1, "conv2.bias"),
        arr((10, 4 * c2), 4 * c2, "fc.weight"),
        arr((10,), 4 * c2, "fc.bias"),
    ]
    nodes = [
        helper.make_node(
            "Conv",
            ["input", "conv1.weight", "conv1.bias"],
            ["c1"],
            name="conv1",
            kernel_shape=[3, 3],
            pads=[1, 1, 1, 1],
        ),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node(
            "MaxPool", ["r1"], ["p1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]
        ),
        helper.make_node(
            "Conv",
            ["p1", "conv2.weight", "conv2.bias"],
            ["c2"],
            name="conv2",
            kernel_shape=[3, 3],
            pads=[1, 1, 1, 1],
        ),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node(
            "AveragePool", ["r2"], ["p2"], name="pool2", kernel_shape=[2, 2], strides=[2, 2]
        ),
        helper.make_node("Flatten", ["p2"], ["flat"], name="flatten", axis=1),
        helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["logits"], name="fc", transB=1),
    ]
    inp = helper.make_tensor_value_info("input", elem, ["N", 1, 8, 8])
    out = helper.make_tensor_value_info("logits", elem, ["N", 10])
    return _finish(nodes, inits, inp, out, "edgefl_digits_cnn")


def load_digits(
    *, test_fraction: float = 0.25, seed: int = 0
) -> tuple[NDArray[np.float32], NDArray[np.int64], NDArray[np.float32], NDArray[np.int64]]:
    """Return scikit-learn's 8x8 digits as ``(x_train, y_train, x_test, y_test)``.

    Pixels are scaled to [0, 1] and flattened to 64 features; the split is a
    seeded permutation. Requires scikit-learn (the ``sim`` extra).

    Raises:
        ImportError: scikit-learn is not installed.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1). Found {test_fraction!r}")
    from sklearn.datasets import load_digits as _sk_load_digits

    data = _sk_load_digits()
    x = (np.asarray(data.data, dtype=np.float32) / 16.0).astype(np.float32)
    y = np.asarray(data.target, dtype=np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = round(len(x) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]
