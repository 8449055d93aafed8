"""``edgefl aggregator``: run the aggregator service, or write an example config."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from pathlib import Path
from types import FrameType

from edge_sdk.errors import ConfigError

__all__ = ["register"]

log = logging.getLogger("edgefl.aggregator")


def register(parser: argparse.ArgumentParser) -> None:
    """Add ``serve``, ``identity`` and ``init``."""
    sub = parser.add_subparsers(dest="aggregator_command", metavar="ACTION")
    serve = sub.add_parser("serve", help="run rounds until stopped (or the rounds are done)")
    serve.add_argument("--config", required=True, help="aggregator.toml")
    serve.add_argument(
        "--exit-when-done", action="store_true", help="exit after the configured rounds"
    )
    serve.add_argument(
        "--worker",
        type=int,
        metavar="K",
        help="run worker K (0..workers-1) of a sharded aggregator ([aggregator] workers > 1) "
        "instead of its root",
    )
    serve.set_defaults(func=_serve)
    ident = sub.add_parser(
        "identity", help="print the aggregator's signing public key (for device configs)"
    )
    ident.add_argument("--config", required=True, help="aggregator.toml")
    ident.add_argument("--json", action="store_true", help="print as JSON")
    ident.set_defaults(func=_identity)
    init = sub.add_parser("init", help="write an example aggregator.toml")
    init.add_argument("path", nargs="?", default="aggregator.toml")
    init.add_argument("--force", action="store_true", help="overwrite an existing file")
    init.add_argument(
        "--model",
        metavar="FILE.onnx",
        help="fill `dimension` from this ONNX model and write its own weights as the "
        "initial model (a symmetric MLP started at zeros never trains)",
    )
    init.add_argument(
        "--loss", default="softmax_cross_entropy", help="the loss devices train --model with"
    )
    init.set_defaults(func=_init)


def _identity(args: argparse.Namespace) -> int:
    from aggregator.config import aggregator_identity, load_config
    from edge_sdk.cli import emit

    identity = aggregator_identity(load_config(args.config))
    key = identity.public_key_bytes.hex()
    emit(
        {"aggregator_key": key},
        as_json=args.json,
        text=f'{key}\n(put it in each device.toml as [keys] aggregator_key = "{key}")',
    )
    return 0


def _init(args: argparse.Namespace) -> int:
    from aggregator.config import EXAMPLE

    target = Path(args.path)
    if target.exists() and not args.force:
        raise ConfigError(f"{target} exists; use --force to overwrite")
    text = EXAMPLE
    if args.model:
        import numpy as np

        from edge_sdk.errors import EdgeFLError
        from edge_sdk.models import OnnxModel

        try:
            model = OnnxModel.from_file(args.model, loss=args.loss)
        except (EdgeFLError, OSError) as exc:
            raise ConfigError(f"--model {args.model}: {exc}") from None
        weights = model.get_flat().astype(np.float32)
        initial = target.with_name(target.stem + "-initial.npy")
        np.save(initial, weights)
        text = text.replace("dimension = 7850", f"dimension = {weights.size}", 1).replace(
            'initial_model = ""', f'initial_model = "{initial.name}"', 1
        )
        print(f"model {args.model}: {weights.size} trainable values; wrote {initial}")
    target.write_text(text, encoding="utf-8")
    print(f"wrote {target}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from aggregator.config import build_aggregator, load_config

    cfg = load_config(args.config)
    service = build_aggregator(cfg, worker=args.worker)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    tick = cfg.aggregator.tick_s
    service.start()
    role = "" if args.worker is None else f" worker {args.worker} of {cfg.aggregator.workers}"
    if args.worker is None and cfg.aggregator.workers > 1:
        role = f" root of {cfg.aggregator.workers} workers"
    print(
        f"aggregator{role} serving federation {service.machine.config.federation}: "
        f"round {service.machine.round_id} ({service.machine.phase})",
        flush=True,
    )
    try:
        while not stop.is_set():
            service.pump(timeout=tick)
            if args.exit_when_done and service.done:
                break
    finally:
        service.close()
        print(
            f"aggregator stopped: {service.updates_committed} accepted updates committed in "
            f"{service.accept_commits} transactions (commit_batch {service.commit_batch})",
            flush=True,
        )
    return 0
