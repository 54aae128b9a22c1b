"""Staged, resumable training of the reference UMM on CPU (fixed seeds; every batch derives from its step).

Stages (measured reasons in reports/umm_training.md):
1. `vae`: the AutoencoderKL alone as an autoencoder on canvases (L1 + MSE + small KL); then the latent
   scale is set so the flow sees unit-variance latents.
2. `warm`: the conv stem + SigLIP tower alone on a dense task (digit class under every patch): without
   it, recognition questions sit at chance for many minutes while counting is learned.
3. `joint`: all questions of all five types per canvas (packed, exact block mask) + rectified-flow
   generation + the dense loss as auxiliary; VAE frozen. From `dropout_start` on, every understanding
   batch keeps a random subset of image tokens (keep ratio ~ U[keep_min, 1], a random bias for or
   against digit tokens: `random_keep`) so that reducers are measured, not the shift from full sets.
4. `gen`: the generation loss alone, training the decoder and the generation heads (vision tower,
   connector and VAE frozen). In the joint stage the flow head learns where to draw long before it
   learns which digit; measured on a 1600-step joint model: 1200 such steps at peak lr 5e-4 took
   classifier accuracy from 25% to 72-82% while question accuracy went from 93.8% to 92.7% (at 1e-3:
   95% but 79%; adding a rehearsal batch of questions kept accuracy but slowed generation to 38% at
   800 steps).

Each step's data and noise come from seeds (seed, stage, step), so a resumed run repeats exactly the
batches it would have seen; checkpoints (model + optimizer, safetensors) are written every few minutes.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor

from adatsq.core.io import atomic_write, write_json
from adatsq.errors import CheckpointError, ConfigError
from adatsq.models.umm.data import QUESTION_TYPES, QABatch, gen_batch, qa_batch, sample_canvas
from adatsq.models.umm.model import MiniUMM, UMMConfig
from adatsq.tokens.base import keep_count
from adatsq.tokens.umm.evaluate import full_answers, qa_accuracy

log = logging.getLogger(__name__)
STAGES = ("vae", "warm", "joint", "gen")


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    vae_steps: int = 1200  # 300 steps: the classifier read 81.5% of VAE reconstructions, 1200: 98%
    vae_batch: int = 32
    vae_lr: float = 2e-3
    vae_kl: float = 1e-5  # small: enough to keep latents bounded, not enough to blur digits
    warm_steps: int = 250
    warm_batch: int = 64
    warm_lr: float = 2e-3
    joint_steps: int = 3000
    und_batch: int = 32  # canvases per step; each asks all four question types
    gen_batch: int = 96
    lr: float = 1e-3
    dropout_start: float = 0.6  # fraction of joint steps after which random token dropout is on
    keep_min: float = 0.25
    aux_weight: float = 0.5
    gen_steps: int = 1200
    gen_lr: float = 5e-4  # 1e-3 drew digits faster but cost 15 points of question accuracy
    eval_every: int = 200
    checkpoint_every_s: float = 180.0

    def __post_init__(self) -> None:
        if not 0 <= self.dropout_start <= 1 or not 0 < self.keep_min <= 1:
            raise ConfigError("dropout_start must be in [0, 1] and keep_min in (0, 1]")

    def steps(self, stage: str) -> int:
        return {
            "vae": self.vae_steps,
            "warm": self.warm_steps,
            "joint": self.joint_steps,
            "gen": self.gen_steps,
        }[stage]


def lr_at(step: int, steps: int, peak: float, warmup: int = 30) -> float:
    """Linear warm-up then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def stage_params(model: MiniUMM, stage: str) -> list[torch.nn.Parameter]:
    if stage == "vae":
        return list(model.vae.parameters())
    if stage == "warm":
        return [*model.stem.parameters(), *model.vision.parameters(), *model.token_head.parameters()]
    if stage == "gen":
        heads = (model.lm, model.vae2llm, model.time_embed, model.llm2vae)
        return [*(p for m in heads for p in m.parameters()), model.gen_pos]
    vae = {id(p) for p in model.vae.parameters()}
    return [p for p in model.parameters() if id(p) not in vae]


# ---- losses -------------------------------------------------------------------------------------
def vae_loss(model: MiniUMM, rng: np.random.Generator, cfg: TrainConfig) -> tuple[Tensor, dict]:
    images = torch.from_numpy(np.stack([sample_canvas(rng, "train").image for _ in range(cfg.vae_batch)]))
    images = images[:, None]
    posterior = model.vae.encode(images).latent_dist
    recon = model.vae.decode(posterior.sample()).sample
    rec = F.l1_loss(recon, images) + F.mse_loss(recon, images)
    kl = posterior.kl().mean() / images[0].numel()
    return rec + cfg.vae_kl * kl, {"rec": rec.item(), "kl": kl.item()}


def warm_loss(model: MiniUMM, rng: np.random.Generator, cfg: TrainConfig) -> tuple[Tensor, dict]:
    batch = qa_batch(rng, cfg.warm_batch, kinds=(), patch=model.config.vit_patch)
    logits = model.token_head(model.vision_features(batch.images))
    dense = dense_loss(logits, batch.token_labels)
    return dense, {"dense": dense.item()}


def dense_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Digit class under every patch + which digits are present (max over patches, multi-label).

    The presence term is what made recognition start early on the prototype; the per-patch term adds
    where each digit is.
    """
    per_patch = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
    present = torch.zeros(labels.shape[0], 11).scatter_(1, labels, 1.0)[:, :10]
    presence = F.binary_cross_entropy_with_logits(logits[..., :10].amax(1), present)
    return per_patch + presence


def random_keep(
    n: int, keep: float, gen: torch.Generator, foreground: Tensor, max_bias: float = 16.0
) -> Tensor:
    """Ascending random kept indices [B, K] (the same K for the whole batch), foreground-biased.

    Tokens are drawn without replacement (Gumbel top-k) with weight `bias` on digit tokens and 1 on
    background, log(bias) ~ U[-log max_bias, log max_bias] per batch. Uniform dropout alone keeps the
    share of digit tokens unbiased, so a model can still count from token density, which any
    content-based reducer (keeping mostly digits, or mostly background) then breaks.
    """
    k = keep_count(n, keep)
    log_bias = (2 * float(torch.rand(1, generator=gen)) - 1) * math.log(max_bias)
    uniform = torch.rand(foreground.shape, generator=gen).clamp_min(1e-9)
    keys = log_bias * foreground.float() - torch.log(-torch.log(uniform))  # log weight + Gumbel noise
    return keys.topk(k, dim=1).indices.sort(1).values


def flow_loss(model: MiniUMM, rng: np.random.Generator, gen: torch.Generator, cfg: TrainConfig) -> Tensor:
    """Rectified-flow velocity loss on one batch of single-digit canvases and their prompts."""
    gb = gen_batch(rng, cfg.gen_batch)
    x0 = model.patchify(model.encode_latents(gb.images))
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.rand(x0.shape[0], generator=gen)  # uniform: the class is decided at high noise levels
    xt = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
    return F.mse_loss(model.predict_velocity(gb.prompts, model.latent_tokens(xt, t)), noise - x0)


def understanding_loss(
    model: MiniUMM, qa: QABatch, tokens: Tensor, gen: torch.Generator, cfg: TrainConfig, dropout: bool
) -> Tensor:
    """Mean answer cross-entropy over the question types, optionally on a random biased token subset."""
    b, n, d = tokens.shape
    kept = torch.arange(n).expand(b, n)
    if dropout:
        keep = cfg.keep_min + (1 - cfg.keep_min) * float(torch.rand(1, generator=gen))
        kept = random_keep(n, keep, gen, foreground=qa.token_labels < 10)
        tokens = tokens.gather(1, kept[..., None].expand(-1, -1, d))
    logits = model.understand_tokens(tokens, kept, [qa.questions[k] for k in QUESTION_TYPES])
    und = sum(F.cross_entropy(lg, qa.answers[k]) for lg, k in zip(logits, QUESTION_TYPES, strict=True))
    return und / len(QUESTION_TYPES)


def joint_loss(
    model: MiniUMM, rng: np.random.Generator, gen: torch.Generator, cfg: TrainConfig, dropout: bool
) -> tuple[Tensor, dict]:
    qa = qa_batch(rng, cfg.und_batch, patch=model.config.vit_patch)
    feats = model.vision_features(qa.images)
    aux = dense_loss(model.token_head(feats), qa.token_labels)
    und = understanding_loss(model, qa, model.connector(feats), gen, cfg, dropout)
    flow = flow_loss(model, rng, gen, cfg)
    loss = und + flow + cfg.aux_weight * aux
    return loss, {"und": und.item(), "flow": flow.item(), "dense": aux.item()}


# ---- checkpoints --------------------------------------------------------------------------------
def _save_checkpoint(run: Path, model: MiniUMM, opt: torch.optim.Optimizer, state: dict) -> None:
    osd = opt.state_dict()
    tensors = {
        f"{idx}.{key}": value.reshape(-1) if value.dim() == 0 else value
        for idx, entry in osd["state"].items()
        for key, value in entry.items()
    }
    atomic_write(run / "model.safetensors", lambda tmp: save_file(dict(model.state_dict()), tmp))
    atomic_write(run / "optim.safetensors", lambda tmp: save_file(tensors, tmp))
    meta = {**state, "config": model.config.to_dict(), "param_groups": osd["param_groups"]}
    write_json(run / "state.json", meta)


def _load_optimizer(run: Path, opt: torch.optim.Optimizer, meta: dict) -> None:
    flat = load_file(str(run / "optim.safetensors"))
    state: dict[int, dict[str, Tensor]] = {}
    for name, value in flat.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value.reshape(()) if key == "step" else value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _make_optimizer(model: MiniUMM, stage: str, lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(stage_params(model, stage), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))


def _peak_lr(cfg: TrainConfig, stage: str) -> float:
    return {"vae": cfg.vae_lr, "warm": cfg.warm_lr, "joint": cfg.lr, "gen": cfg.gen_lr}[stage]


@torch.no_grad()
def _set_latent_scale(model: MiniUMM, seed: int) -> None:
    rng = np.random.default_rng([seed, 99])
    images = torch.from_numpy(np.stack([sample_canvas(rng, "train").image for _ in range(256)]))[:, None]
    means = model.vae.encode(images).latent_dist.mean
    model.config = replace(model.config, latent_scale=float(1.0 / means.std()))


def train(
    run: Path,
    cfg: TrainConfig,
    model_config: UMMConfig | None = None,
    on_eval: Callable[[MiniUMM, str, int], dict] | None = None,
) -> tuple[MiniUMM, list[dict]]:
    """Run (or resume) all stages in `run`; returns the trained model and the metric log.

    Runs on a forked global RNG (seeded from `cfg.seed`), so the caller's random state is untouched.
    """
    with torch.random.fork_rng():
        return _train(Path(run), cfg, model_config, on_eval)


@dataclass
class _Session:
    """What every stage of one `train` invocation shares: where it writes, how it evaluates, the clock."""

    run: Path
    cfg: TrainConfig
    on_eval: Callable[[MiniUMM, str, int], dict] | None
    history: list[dict]
    elapsed_before: float = 0.0
    invocation_start: float = field(default_factory=time.monotonic)

    def elapsed(self) -> float:
        return self.elapsed_before + time.monotonic() - self.invocation_start


def _train(
    run: Path,
    cfg: TrainConfig,
    model_config: UMMConfig | None,
    on_eval: Callable[[MiniUMM, str, int], dict] | None,
) -> tuple[MiniUMM, list[dict]]:
    run.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)  # inside `train`'s fork_rng: initialisation and VAE posterior samples
    model = MiniUMM(model_config or UMMConfig())
    meta = json.loads((run / "state.json").read_text()) if (run / "state.json").is_file() else None
    session = _Session(run, cfg, on_eval, history=[])
    stage_index, start = 0, 0
    if meta is not None:
        model, stage_index, start = _resume(session, meta)
    for stage in STAGES[stage_index:]:
        resume = meta if meta is not None and meta["stage"] == stage and start > 0 else None
        _train_stage(session, model, stage, start, resume)
        _finish_stage(session, model, stage)
        start, meta = 0, None
    return model.eval(), session.history


def _resume(session: _Session, meta: dict) -> tuple[MiniUMM, int, int]:
    """The model saved in the run folder, the index of the stage to continue and its first step."""
    run = session.run
    if meta["train_config"] != asdict(session.cfg):
        raise CheckpointError(f"{run} was started with another TrainConfig; use a new run folder")
    model = MiniUMM(UMMConfig.from_dict(meta["config"]))
    model.load_state_dict(load_file(str(run / "model.safetensors")))
    done = meta["stage"] == "done"
    stage_index = len(STAGES) if done else STAGES.index(meta["stage"])
    session.history = meta["history"]
    session.elapsed_before = meta.get("elapsed_s", 0.0)
    log.info("resuming %s at stage %s step %d", run, meta["stage"], meta["step"])
    return model, stage_index, meta["step"]


def _train_stage(session: _Session, model: MiniUMM, stage: str, start: int, resume: dict | None) -> None:
    """Steps `start`.. of one stage (optimizer state from `resume` when continuing it), with evaluations
    and checkpoints."""
    cfg = session.cfg
    steps, peak = cfg.steps(stage), _peak_lr(cfg, stage)
    model.train()
    opt = _make_optimizer(model, stage, peak)
    if resume is not None:
        _load_optimizer(session.run, opt, resume)
    last_save, t0 = time.monotonic(), time.monotonic()
    for step in range(start, steps):
        parts = _train_step(model, opt, cfg, stage, step, peak)
        if step % 25 == 0 or step == steps - 1:
            rate = (time.monotonic() - t0) / (step - start + 1)
            log.info("%s %d/%d %s (%.2f s/step)", stage, step, steps, _fmt(parts), rate)
        record = stage in ("joint", "gen") and ((step + 1) % cfg.eval_every == 0 or step == steps - 1)
        if record:
            _evaluate(session, model, stage, step + 1, parts)
        if time.monotonic() - last_save > cfg.checkpoint_every_s or record:
            _save_checkpoint(
                session.run, model, opt, _state(stage, step + 1, session.history, cfg, session.elapsed())
            )
            last_save = time.monotonic()


def _train_step(
    model: MiniUMM, opt: torch.optim.Optimizer, cfg: TrainConfig, stage: str, step: int, peak: float
) -> dict:
    """One optimizer step on the data and noise of (seed, stage, step); returns the loss parts."""
    steps = cfg.steps(stage)
    rng = np.random.default_rng([cfg.seed, STAGES.index(stage), step])
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 7919 * STAGES.index(stage) + step)
    for group in opt.param_groups:
        group["lr"] = lr_at(step, steps, peak)
    if stage == "vae":
        loss, parts = vae_loss(model, rng, cfg)
    elif stage == "warm":
        loss, parts = warm_loss(model, rng, cfg)
    elif stage == "joint":
        loss, parts = joint_loss(model, rng, gen, cfg, dropout=step >= cfg.dropout_start * steps)
    else:
        loss = flow_loss(model, rng, gen, cfg)
        parts = {"flow": loss.item()}
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(stage_params(model, stage), 1.0)
    opt.step()
    return parts


def _evaluate(session: _Session, model: MiniUMM, stage: str, step: int, parts: dict) -> None:
    """Held-out question accuracy (+ the caller's `on_eval`) appended to the history."""
    model.eval()
    entry = {"stage": stage, "step": step, "loss": parts}
    entry["qa"] = qa_accuracy(full_answers(model), samples=256)
    entry.update(session.on_eval(model, stage, step) if session.on_eval else {})
    session.history.append(entry)
    log.info("eval %s", json.dumps(entry))
    model.train()


def _finish_stage(session: _Session, model: MiniUMM, stage: str) -> None:
    """After a stage: fix the latent scale (VAE stage) and checkpoint at step 0 of the next stage."""
    cfg = session.cfg
    if stage == "vae":
        _set_latent_scale(model, cfg.seed)
        log.info("latent scale %.4f", model.config.latent_scale)
    nxt = STAGES.index(stage) + 1
    following = STAGES[nxt] if nxt < len(STAGES) else "done"
    opt_next = _make_optimizer(model, STAGES[min(nxt, len(STAGES) - 1)], 0.0)
    _save_checkpoint(
        session.run, model, opt_next, _state(following, 0, session.history, cfg, session.elapsed())
    )


def _state(stage: str, step: int, history: list[dict], cfg: TrainConfig, elapsed_s: float) -> dict:
    """Resume point; `elapsed_s` is the wall time of all invocations so far (up to this checkpoint)."""
    return {
        "stage": stage,
        "step": step,
        "history": history,
        "train_config": asdict(cfg),
        "elapsed_s": elapsed_s,
    }


def _fmt(parts: dict) -> str:
    return " ".join(f"{k}={v:.4f}" for k, v in parts.items())
