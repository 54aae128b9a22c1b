"""Staged UMM training: an interrupted run resumes to exactly the weights of an uninterrupted one."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from adatsq.errors import CheckpointError
from adatsq.models.umm.model import MiniUMM, UMMConfig
from adatsq.tokens.umm.train import TrainConfig, lr_at, stage_params, train

CFG = TrainConfig(
    vae_steps=1,
    vae_batch=2,
    warm_steps=1,
    warm_batch=2,
    joint_steps=2,
    gen_steps=1,
    und_batch=2,
    gen_batch=2,
    dropout_start=0.5,  # the second joint step trains with random token dropout
    eval_every=1,
    checkpoint_every_s=0.0,
)


class Stop(Exception):
    pass


@pytest.fixture(scope="module")
def tiny(tiny_config: UMMConfig) -> UMMConfig:
    return replace(tiny_config, lm_layers=2)


def test_lr_schedule_warms_up_and_decays() -> None:
    assert lr_at(0, 100, 1.0) < lr_at(29, 100, 1.0) == pytest.approx(1.0)
    assert lr_at(99, 100, 1.0) == pytest.approx(0.1, abs=0.01)


def test_interrupted_training_resumes_exactly(tmp_path, tiny: UMMConfig) -> None:
    reference, history = train(tmp_path / "a", CFG, tiny)
    assert [(h["stage"], h["step"]) for h in history] == [("joint", 1), ("joint", 2), ("gen", 1)]

    calls: list[int] = []

    def stop_once(model, stage, step):
        calls.append(step)
        if len(calls) == 1:
            raise Stop
        return {}

    with pytest.raises(Stop):
        train(tmp_path / "b", CFG, tiny, on_eval=stop_once)
    resumed, _ = train(tmp_path / "b", CFG, tiny, on_eval=stop_once)
    assert calls == [1, 1, 2, 1]  # the interrupted joint step ran again, then the generation stage
    assert resumed.config == reference.config  # including the latent scale set after the VAE stage
    for (name, a), (_, b) in zip(reference.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name

    with pytest.raises(CheckpointError, match="another TrainConfig"):
        train(tmp_path / "b", TrainConfig(), tiny)


def test_generation_stage_trains_the_decoder_not_the_encoders(tiny: UMMConfig) -> None:
    model = MiniUMM(tiny)
    trained = {id(p) for p in stage_params(model, "gen")}
    assert {id(p) for p in model.lm.parameters()} <= trained
    assert {id(p) for p in model.llm2vae.parameters()} <= trained and id(model.gen_pos) in trained
    for frozen in (model.vision, model.vae, model.connector, model.stem):
        assert not {id(p) for p in frozen.parameters()} & trained
