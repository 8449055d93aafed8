"""Ten small PyTorch model families and their edgefl parity check.

Each :class:`Family` builds a seeded ``torch.nn.Module``, makes a small
dataset, and names the edgefl loss. :func:`parity` exports the module with
:func:`edge_sdk.models.export_torch`, trains it for 20 SGD steps in edgefl and
in PyTorch from the same weights on the same batches, and compares the
weights, then exports the trained model back to inference ONNX and compares
its predictions with the PyTorch module in ``eval()`` mode.

PyTorch is needed here (it is a workstation / test dependency, not a device one).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from edge_sdk.models import OnnxModel, TrainConfig, export_torch

N_EXAMPLES = 64
BATCH = 16
EPOCHS = 5  # 4 batches per epoch: 20 SGD steps
SEED = 3


class MLP(nn.Module):
    """GELU, Tanh and Sigmoid activations with Dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(12, 16)
        self.fc2 = nn.Linear(16, 16)
        self.fc3 = nn.Linear(16, 12)
        self.drop = nn.Dropout(0.2)
        self.out = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the logits for a batch."""
        h = nn.functional.gelu(self.fc1(x))
        h = self.drop(torch.tanh(self.fc2(h)))
        return self.out(torch.sigmoid(self.fc3(h)))


class ConvBN(nn.Module):
    """Conv -> BatchNorm -> ReLU -> MaxPool, twice, then a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6 * 2 * 2, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the logits for a batch."""
        h = nn.functional.max_pool2d(torch.relu(self.bn1(self.conv1(x))), 2)
        h = nn.functional.avg_pool2d(torch.relu(self.bn2(self.conv2(h))), 2)
        return self.fc(h.flatten(1))


class DepthwiseSeparable(nn.Module):
    """Depthwise 3x3 conv (groups = channels) + pointwise 1x1, ReLU6, global pooling."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, 6, 3, padding=1)
        self.depthwise = nn.Conv2d(6, 6, 3, padding=1, groups=6)
        self.pointwise = nn.Conv2d(6, 8, 1)
        self.act = nn.ReLU6()
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the logits for a batch."""
        h = self.act(self.stem(x) * 3.0)
        h = self.act(self.pointwise(self.act(self.depthwise(h))))
        return self.fc(nn.functional.adaptive_avg_pool2d(h, 1).flatten(1))


class Conv1D(nn.Module):
    """1-D convolutions with adaptive average pooling."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(2, 6, 5, padding=2)
        self.conv2 = nn.Conv1d(6, 6, 3, stride=2)
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the logits for a batch."""
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(self.pool(h).flatten(1))


class GRUClassifier(nn.Module):
    """A one-layer GRU over the sequence; the last hidden state feeds a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(3, 8, batch_first=True)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the logits for a batch."""
        _, h = self.rnn(x)
        return self.fc(h[-1])


class LSTMClassifier(nn.Module):
    """A one-layer LSTM over the sequence; the last hidden state feeds a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(3, 8, batch_first=True)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the logits for a batch."""
        _, (h, _) = self.rnn(x)
        return self.fc(h[-1])


class Attention(nn.Module):
    """LayerNorm + single-head self-attention with a residual, mean-pooled."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.scale = 1.0 / math.sqrt(dim)
        self.fc = nn.Linear(dim, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the logits for a batch."""
        h = self.norm(x)
        scores = torch.matmul(self.q(h), self.k(h).transpose(1, 2)) * self.scale
        h = x + torch.matmul(torch.softmax(scores, dim=-1), self.v(h))
        return self.fc(h.mean(dim=1))


class BagOfWords(nn.Module):
    """Embedding of int64 token ids, averaged, then a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.fc = nn.Linear(8, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Return the logits for a batch."""
        return self.fc(self.emb(ids).mean(dim=1))


def _classes(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 4, size=n).astype(np.int64)


@dataclass(frozen=True)
class Family:
    """One model family: module, data and loss."""

    make: Callable[[], nn.Module]
    data: Callable[[np.random.Generator], tuple[np.ndarray, np.ndarray]]
    loss: str = "softmax_cross_entropy"
    lr: float = 0.1


FAMILIES: dict[str, Family] = {
    "mlp": Family(
        MLP, lambda r: (r.normal(size=(N_EXAMPLES, 12)).astype(np.float32), _classes(r, N_EXAMPLES))
    ),
    "cnn_bn": Family(
        ConvBN,
        lambda r: (
            r.uniform(size=(N_EXAMPLES, 1, 8, 8)).astype(np.float32),
            _classes(r, N_EXAMPLES),
        ),
    ),
    "depthwise": Family(
        DepthwiseSeparable,
        lambda r: (
            r.normal(size=(N_EXAMPLES, 2, 6, 6)).astype(np.float32),
            _classes(r, N_EXAMPLES),
        ),
    ),
    "cnn1d": Family(
        Conv1D,
        lambda r: (r.normal(size=(N_EXAMPLES, 2, 16)).astype(np.float32), _classes(r, N_EXAMPLES)),
    ),
    "gru": Family(
        GRUClassifier,
        lambda r: (r.normal(size=(N_EXAMPLES, 6, 3)).astype(np.float32), _classes(r, N_EXAMPLES)),
    ),
    "lstm": Family(
        LSTMClassifier,
        lambda r: (r.normal(size=(N_EXAMPLES, 6, 3)).astype(np.float32), _classes(r, N_EXAMPLES)),
    ),
    "attention": Family(
        Attention,
        lambda r: (r.normal(size=(N_EXAMPLES, 5, 8)).astype(np.float32), _classes(r, N_EXAMPLES)),
    ),
    "bag_of_words": Family(
        BagOfWords,
        lambda r: (r.integers(0, 20, size=(N_EXAMPLES, 7)), _classes(r, N_EXAMPLES)),
        lr=0.5,
    ),
    "logistic": Family(
        lambda: nn.Linear(6, 1),
        lambda r: (
            r.normal(size=(N_EXAMPLES, 6)).astype(np.float32),
            r.integers(0, 2, size=(N_EXAMPLES, 1)).astype(np.float32),
        ),
        loss="binary_cross_entropy",
    ),
    "mse": Family(
        lambda: nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1)),
        lambda r: (
            r.normal(size=(N_EXAMPLES, 6)).astype(np.float32),
            r.normal(size=(N_EXAMPLES, 1)).astype(np.float32),
        ),
        loss="mse",
    ),
}


def build(name: str, seed: int = 0) -> tuple[nn.Module, np.ndarray, np.ndarray]:
    """Return a freshly seeded module of family ``name`` and its dataset."""
    family = FAMILIES[name]
    torch.manual_seed(seed)
    net = family.make()
    x, y = family.data(np.random.default_rng(seed + 1))
    return net, x, y


def torch_loss(loss: str) -> nn.Module:
    """The PyTorch loss matching an edgefl loss name."""
    return {
        "softmax_cross_entropy": nn.CrossEntropyLoss(),
        "binary_cross_entropy": nn.BCEWithLogitsLoss(),
        "mse": nn.MSELoss(),
    }[loss]


def train_mode(net: nn.Module) -> None:
    """PyTorch's training mode as edgefl runs it: batch-statistics BatchNorm, no Dropout."""
    net.train()
    for module in net.modules():
        if isinstance(module, nn.Dropout):
            module.eval()


def train_torch(
    net: nn.Module, x: np.ndarray, y: np.ndarray, loss: str, cfg: TrainConfig, seed: int
) -> int:
    """Train ``net`` with the batches ``OnnxModel.fit`` uses for ``seed``; return the steps."""
    train_mode(net)
    opt = torch.optim.SGD(
        net.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    loss_fn = torch_loss(loss)
    rng = np.random.default_rng(seed)
    steps = 0
    for _ in range(cfg.epochs):
        order = rng.permutation(len(x))
        for start in range(0, len(x), cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            opt.zero_grad()
            loss_fn(net(torch.from_numpy(x[idx])), torch.from_numpy(y[idx])).backward()
            opt.step()
            steps += 1
    return steps


@dataclass
class ParityResult:
    """What :func:`parity` measured."""

    family: str
    parameters: int
    all_trainable: bool
    max_abs_weights: float
    max_abs_running_stats: float
    max_abs_predictions: float
    steps: int

    @property
    def max_abs(self) -> float:
        """The largest of the three differences."""
        return max(self.max_abs_weights, self.max_abs_running_stats, self.max_abs_predictions)


def parity(name: str, *, momentum: float = 0.0, seed: int = 0, opset: int = 17) -> ParityResult:
    """Train family ``name`` for 20 SGD steps in edgefl and PyTorch and compare."""
    family = FAMILIES[name]
    net, x, y = build(name, seed)
    proto = export_torch(net, torch.from_numpy(x[:2]), opset=opset)
    model = OnnxModel(proto, loss=family.loss)
    names = [n for n, _ in net.named_parameters()]
    cfg = TrainConfig(epochs=EPOCHS, batch_size=BATCH, lr=family.lr, momentum=momentum)
    report = model.fit(x, y, config=cfg, seed=SEED)
    steps = train_torch(net, x, y, family.loss, cfg, SEED)
    assert steps == report.steps
    ours = model.weights()
    theirs = {k: v.detach().numpy() for k, v in net.named_parameters()}
    weights_err = max(float(np.max(np.abs(ours[k] - theirs[k]))) for k in names)
    buffers = {k: v.detach().numpy() for k, v in net.named_buffers() if "running" in k}
    state = model.state
    stats_err = max((float(np.max(np.abs(state[k] - v))) for k, v in buffers.items()), default=0.0)
    net.eval()
    import onnxruntime as ort

    session = ort.InferenceSession(model.export_onnx(), providers=["CPUExecutionProvider"])
    predicted = session.run(None, {session.get_inputs()[0].name: x})[0]
    with torch.no_grad():
        expected = net(torch.from_numpy(x)).numpy()
    pred_err = float(np.max(np.abs(predicted - expected)))
    return ParityResult(
        family=name,
        parameters=model.layout.size,
        all_trainable=set(model.layout.names) == set(names),
        max_abs_weights=weights_err,
        max_abs_running_stats=stats_err,
        max_abs_predictions=pred_err,
        steps=report.steps,
    )


if __name__ == "__main__":
    for family_name in FAMILIES:
        try:
            print(parity(family_name))
        except Exception as exc:  # report and continue
            print(family_name, type(exc).__name__, str(exc)[:300])
