"""Copy probe: how fast does a synthetic preset learn to copy tokens from its prompt?

A tool call is mostly arguments copied out of the request, so a demo base that cannot copy cannot
learn the demo's task. Each probe row is `W PAD SEP W`: W is `--words` random word tokens, PAD is
`--gap` random filler tokens (the rest of a prompt), SEP one fixed token. Only the second W is scored,
so chance is 1/500 per token. Every preset starts from the pre-training init
(`lfm_mlx.demo.pretrain.init_for_training`) and trains with the same AdamW, learning rate and batches.

    python benchmarks/copy_probe.py --preset tiny-moe demo-moe --steps 750

Writes benchmarks/results/copy_probe-<device>.json: per preset, copy accuracy and loss every
`--eval-every` steps on a fixed evaluation batch, and the first step at which accuracy reached 90%.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim

from lfm_mlx.demo.pretrain import init_for_training
from lfm_mlx.fsutil import atomic_write_json
from lfm_mlx.model.io import load
from lfm_mlx.model.synthetic import PRESETS, write_synthetic_model

SEP = 50
FILLER_IDS = (100, 300)  # token id ranges: filler tokens, then word tokens
WORD_IDS = (300, 800)


def probe_batch(size: int, words: int, gap: int) -> tuple[mx.array, mx.array, int]:
    """(inputs, targets, first scored position) for `size` rows of `W PAD SEP W`."""
    w = mx.random.randint(*WORD_IDS, (size, words))
    rows = mx.concatenate([w, mx.random.randint(*FILLER_IDS, (size, gap)), mx.full((size, 1), SEP), w], axis=1)
    return rows[:, :-1], rows[:, 1:], words + gap


def loss_and_accuracy(model, inputs, targets, start):
    logits = model(inputs)[:, start:]
    scored = targets[:, start:]
    return nn.losses.cross_entropy(logits, scored).mean(), (logits.argmax(-1) == scored).mean()


def probe(preset: str, args) -> dict:
    mx.random.seed(args.seed)
    with tempfile.TemporaryDirectory() as scratch:
        model, _ = load(write_synthetic_model(Path(scratch) / "m", preset, seed=args.seed), dtype=mx.float32)
        init_for_training(model, args.seed)
        mx.eval(model.parameters())  # materialized before the scratch files go
    optimizer = optim.AdamW(learning_rate=args.lr, weight_decay=0.0)
    loss_and_grad = nn.value_and_grad(model, lambda m, x, y, s: loss_and_accuracy(m, x, y, s)[0])
    eval_batch = probe_batch(128, args.words, args.gap)  # one fixed batch, so curves are comparable
    curve, reached, started = [], None, time.perf_counter()
    model.train()
    for step in range(args.steps + 1):
        if step % args.eval_every == 0 or step == args.steps:
            loss, accuracy = loss_and_accuracy(model, *eval_batch)
            curve.append({"step": step, "loss": round(loss.item(), 4), "copy_accuracy": round(accuracy.item(), 4),
                          "seconds": round(time.perf_counter() - started, 1)})
            print(f"{preset:>10} step {step:5d}  loss {curve[-1]['loss']:.3f}  copy accuracy "
                  f"{curve[-1]['copy_accuracy']:.3f}", flush=True)
            if reached is None and accuracy.item() >= 0.9:
                reached = step
                break  # the question is how soon, not how far
        if step == args.steps:
            break
        loss, grads = loss_and_grad(model, *probe_batch(args.batch_size, args.words, args.gap))
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state)
    spec = PRESETS[preset]
    return {"preset": preset, "layers": spec["num_hidden_layers"], "attention_layers": spec["attention_layers"],
            "hidden_size": spec["hidden_size"], "steps_to_90pct": reached,
            "final_copy_accuracy": curve[-1]["copy_accuracy"], "curve": curve}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", nargs="+", default=["tiny-moe", "demo-moe"], choices=sorted(PRESETS))
    parser.add_argument("--steps", type=int, default=750, help="most training steps per preset")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--words", type=int, default=8, help="tokens to copy per row")
    parser.add_argument("--gap", type=int, default=40, help="filler tokens between the words and the copy")
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="result JSON (default benchmarks/results/copy_probe-<device>.json)")
    args = parser.parse_args(argv)
    device = "gpu" if mx.default_device() == mx.gpu else "cpu"
    results = [probe(preset, args) for preset in args.preset]
    report = {"benchmark": "copy_probe", "device": device, "machine": platform.platform(),
              "processor": platform.processor(), "mlx_version": mx.__version__,
              "settings": {k: v for k, v in vars(args).items() if k != "out"}, "presets": results}
    out = Path(args.out or Path(__file__).parent / "results" / f"copy_probe-{device}.json")
    atomic_write_json(out, report)  # a killed run leaves the last good result in place
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
