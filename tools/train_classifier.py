"""Train the digit classifier used to score reference-DiT samples (seconds on one CPU thread).

    python tools/train_classifier.py

Writes adatsq/assets/digit_classifier.{safetensors,json}; the JSON records the held-out accuracy.
"""

from __future__ import annotations

import argparse
import logging
import time

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from adatsq.core.io import atomic_write, write_json
from adatsq.eval.metrics import accuracy
from adatsq.models.reference.classifier import META_FILE, WEIGHTS_FILE, DigitClassifier
from adatsq.models.reference.digits import augment, load_digits_16

log = logging.getLogger("train_classifier")


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    train_x, train_y = load_digits_16("train")
    test_x, test_y = load_digits_16("test")
    model = DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=args.lr, total_steps=args.epochs * -(-len(train_y) // args.batch)
    )
    start = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(train_y), generator=gen)
        for i in range(0, len(order), args.batch):
            idx = order[i : i + args.batch]
            # Shifts make it robust to the slightly off-centre digits a generator produces.
            loss = F.cross_entropy(model(augment(train_x[idx], gen)), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if (epoch + 1) % 10 == 0:
            with torch.no_grad():
                acc = accuracy(model.eval()(test_x), test_y)
            log.info("epoch %d loss %.4f held-out accuracy %.4f", epoch + 1, loss.item(), acc)
    seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        test_acc = accuracy(model(test_x), test_y)
        train_acc = accuracy(model(train_x), train_y)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    atomic_write(WEIGHTS_FILE, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    meta = {
        "format_version": 1,
        "config": model.config,
        "training": {
            "epochs": args.epochs,
            "batch": args.batch,
            "lr": args.lr,
            "seed": args.seed,
            "optimizer": "AdamW(wd=1e-4), one-cycle",
            "augmentation": "random ±1 px translation",
            "data": "sklearn digits train split of load_digits_16 (80%, stratified, seed 0)",
            "train_seconds": round(seconds, 1),
            "threads": args.threads,
        },
        "test_accuracy": test_acc,
        "train_accuracy": train_acc,
        "test_size": len(test_y),
    }
    write_json(META_FILE, meta)
    log.info(
        "held-out accuracy %.4f (train %.4f) in %.1f s; saved %s", test_acc, train_acc, seconds, WEIGHTS_FILE
    )


if __name__ == "__main__":
    main()
