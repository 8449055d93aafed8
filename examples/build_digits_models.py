"""Build the digits MLP and CNN as ONNX files, and optionally train them locally.

Trust assumptions: none beyond the local machine. The models are built in
code from a seed (no download); the digits data is the 8x8 set bundled with
scikit-learn (``pip install edgefl[sim]``). Training here is plain local SGD on
one machine: no federation, no privacy noise, no encryption. The files it
writes are ordinary inference models that any ONNX runtime can load, and that
``OnnxModel.from_file`` turns back into trainable models.

Run:
    python examples/build_digits_models.py --out models/
    python examples/build_digits_models.py --out models/ --train --epochs 5
"""

from __future__ import annotations

import argparse
from pathlib import Path

import onnx

from edge_sdk.models import OnnxModel, TrainConfig, zoo


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("models"), help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial weights")
    parser.add_argument("--hidden", type=int, default=64, help="hidden units of the MLP")
    parser.add_argument("--train", action="store_true", help="train locally, then save")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--lr", type=float, default=0.1)
    args = parser.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    builds = {
        "digits_mlp.onnx": zoo.digits_mlp(hidden=args.hidden, seed=args.seed),
        "digits_cnn.onnx": zoo.digits_cnn(seed=args.seed),
    }
    data = zoo.load_digits(seed=args.seed) if args.train else None
    for filename, proto in builds.items():
        path = args.out / filename
        onnx.save(proto, path)
        model = OnnxModel.from_file(path)
        line = f"{path}: {model.layout.size} weights in {len(model.layout.specs)} tensors"
        if data is not None:
            x_train, y_train, x_test, y_test = data
            before = model.evaluate(x_test, y_test)["accuracy"]
            config = TrainConfig(epochs=args.epochs, batch_size=32, lr=args.lr, momentum=0.9)
            model.fit(x_train, y_train, config=config, seed=args.seed)
            after = model.evaluate(x_test, y_test)["accuracy"]
            path.write_bytes(model.export_onnx())
            line += f", test accuracy {before:.3f} -> {after:.3f} (trained, saved)"
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
