"""Parity with PyTorch: same weights, same batches, 20 SGD steps, same result.

The models are exported with ``torch.onnx.export(..., dynamo=False)`` (the
TorchScript exporter; the dynamo exporter needs onnxscript, which is not a
dependency). PyTorch is a dev-only dependency: these tests skip without it.
"""

from __future__ import annotations

import io
import warnings
from typing import Any

import numpy as np
import pytest

from edge_sdk.models import OnnxModel, TrainConfig

torch = pytest.importorskip("torch")

STEPS = 20
BATCH = 16
N = 64  # 4 batches per epoch, 5 epochs = 20 steps


def _mlp() -> Any:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))


def _cnn() -> Any:
    torch.manual_seed(1)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(4, 6, 3, padding=1, stride=1),
        torch.nn.Tanh(),
        torch.nn.AvgPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(24, 10),
    )


class _Residual(torch.nn.Module):  # type: ignore[misc]
    """view() (Shape/Gather/Concat/Reshape), a skip connection, frozen BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.conv2 = torch.nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.drop = torch.nn.Dropout(0.5)
        self.fc = torch.nn.Linear(4 * 16, 10)

    def forward(self, x: Any) -> Any:
        h = self.bn(torch.relu(self.conv(x)))  # not Conv->BN, which export fuses
        h = torch.nn.functional.leaky_relu(h + self.conv2(h), 0.1)
        h = torch.nn.functional.max_pool2d(h, 2)
        return self.fc(self.drop(h.view(h.size(0), -1)))


def _residual() -> Any:
    torch.manual_seed(2)
    net = _Residual()
    with torch.no_grad():  # non-trivial frozen statistics
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 2.0)
    return net.eval()  # BatchNorm uses running statistics, Dropout is identity


def _export(net: Any, example: Any) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net,
            (example,),
            buffer,
            dynamo=False,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
            opset_version=17,
        )
    return buffer.getvalue()


def _train_torch(net: Any, x: np.ndarray, y: np.ndarray, cfg: TrainConfig, seed: int) -> None:
    opt = torch.optim.SGD(
        net.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    loss_fn = torch.nn.CrossEntropyLoss()
    rng = np.random.default_rng(seed)  # the batch order edgefl documents for fit()
    steps = 0
    for _ in range(cfg.epochs):
        order = rng.permutation(len(x))
        for start in range(0, len(x), cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            opt.zero_grad()
            loss = loss_fn(net(torch.from_numpy(x[idx])), torch.from_numpy(y[idx]))
            loss.backward()
            opt.step()
            steps += 1
    assert steps == STEPS


def _relative_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize(
    ("make", "x_shape"),
    [(_mlp, (N, 64)), (_cnn, (N, 1, 8, 8)), (_residual, (N, 1, 8, 8))],
    ids=["mlp", "cnn", "residual-bn"],
)
@pytest.mark.parametrize(
    "cfg",
    [
        TrainConfig(epochs=5, batch_size=BATCH, lr=0.1),
        TrainConfig(epochs=5, batch_size=BATCH, lr=0.05, momentum=0.9, weight_decay=1e-3),
    ],
    ids=["sgd", "momentum-wd"],
)
def test_twenty_sgd_steps_match_pytorch(make: Any, x_shape: tuple[int, ...], cfg: Any) -> None:
    rng = np.random.default_rng(7)
    x = rng.uniform(0, 1, size=x_shape).astype(np.float32)
    y = rng.integers(0, 10, size=N).astype(np.int64)
    net = make()
    model = OnnxModel.from_bytes(_export(net, torch.from_numpy(x[:2])))
    state = {k: v.detach().numpy().copy() for k, v in net.named_parameters()}
    assert set(model.layout.names) == set(state)
    for name, value in model.weights().items():
        np.testing.assert_array_equal(value, state[name])

    report = model.fit(x, y, config=cfg, seed=3)
    _train_torch(net, x, y, cfg, seed=3)

    assert report.steps == STEPS
    trained = {k: v.detach().numpy() for k, v in net.named_parameters()}
    ours = model.weights()
    start = model.layout.concat(state)
    moved = np.linalg.norm(model.get_flat() - start)
    assert moved > 1e-2  # training really changed the weights
    for name, value in trained.items():
        assert _relative_error(ours[name], value) < 1e-4, name
        np.testing.assert_allclose(ours[name], value, rtol=1e-4, atol=1e-5, err_msg=name)
    expected_logits = net(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(model.predict(x), expected_logits, rtol=1e-4, atol=1e-5)


def test_loss_and_gradient_match_autograd_on_one_batch() -> None:
    rng = np.random.default_rng(8)
    x = rng.uniform(0, 1, size=(12, 1, 8, 8)).astype(np.float32)
    y = rng.integers(0, 10, size=12).astype(np.int64)
    net = _cnn()
    model = OnnxModel.from_bytes(_export(net, torch.from_numpy(x[:2])))
    loss, grad = model.loss_and_grad(x, y)
    torch_loss = torch.nn.CrossEntropyLoss()(net(torch.from_numpy(x)), torch.from_numpy(y))
    torch_loss.backward()
    grads = {k: p.grad.numpy() for k, p in net.named_parameters()}
    assert loss == pytest.approx(float(torch_loss.detach()), rel=1e-5)
    np.testing.assert_allclose(grad, model.layout.concat(grads), rtol=1e-4, atol=1e-6)
