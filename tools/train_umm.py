"""Train the reference UMM (miniature BAGEL) and ship it to adatsq/assets/umm; resumable.

    python tools/train_umm.py [--run out/umm_run] [--threads 1] [--smoke]

Stages and reasons: adatsq/tokens/umm/train.py; results: reports/umm_training.md (written here).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from dataclasses import asdict
from pathlib import Path

import torch

from adatsq.models.classifier import load_classifier
from adatsq.tokens.umm.evaluate import full_answers, generation_accuracy, qa_accuracy
from adatsq.tokens.umm.train import TrainConfig, train
from adatsq.tokens.umm.weights import ASSET_DIR, save_umm

ROOT = Path(__file__).resolve().parents[1]
SMOKE = TrainConfig(vae_steps=4, warm_steps=4, joint_steps=6, eval_every=3, checkpoint_every_s=0.0)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", type=Path, default=ROOT / "out" / "umm_run", help="checkpoint folder")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the machine is shared)")
    parser.add_argument("--smoke", action="store_true", help="a few steps of each stage, nothing shipped")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    cfg = SMOKE if args.smoke else TrainConfig()
    classifier = load_classifier()

    def on_eval(model, stage, step):
        return {"generation": generation_accuracy(model, classifier, count=40)}

    start = time.monotonic()
    model, history = train(args.run, cfg, on_eval=on_eval)
    minutes = (time.monotonic() - start) / 60
    if args.smoke:
        return
    final = {
        "qa_full_tokens": qa_accuracy(full_answers(model), samples=1000, seed=4321),
        "generation": generation_accuracy(model, classifier, count=200, seed=1),
    }
    meta = {
        "train_config": asdict(cfg),
        "final": final,
        "parameters": model.num_parameters(),
        "minutes_this_invocation": minutes,
        "machine": f"{platform.processor() or platform.machine()}, {args.threads} torch thread(s)",
        "versions": {"torch": torch.__version__},
        "history": history,
    }
    save_umm(model, ASSET_DIR, extra={"training": meta})
    (args.run / "final.json").write_text(json.dumps(meta, indent=1))
    logging.info("final %s", json.dumps(final))


if __name__ == "__main__":
    main()
