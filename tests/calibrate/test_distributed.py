"""Data-parallel calibration (the planner's path): two gloo processes' all-reduced sums match one's."""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from adatsq.calibrate.runner import collect_stats
from adatsq.calibrate.segments import SegmentMap
from adatsq.models.reference.adapter import ReferenceAdapter
from adatsq.models.reference.model import DigitsPipeline, build_scheduler, build_transformer

INPUTS = [0, 1, 2, 3, 4, 5]


def tiny_stats():
    torch.manual_seed(0)
    adapter = ReferenceAdapter(DigitsPipeline(build_transformer({"num_layers": 1}).eval(), build_scheduler()))
    layers = {n: m for n, m in adapter.denoiser().named_modules() if isinstance(m, torch.nn.Linear)}
    segments = SegmentMap.from_schedule(adapter.step_timesteps(4), 2)
    return collect_stats(adapter, layers, segments, INPUTS, batch_size=2, seed=0, progress=False)


def _worker(rank: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        stats = tiny_stats()
        if rank == 0:
            torch.save({n: (s.xtx, s.tokens, s.absmax) for n, s in stats.items()}, out)
    finally:
        dist.destroy_process_group()


def test_two_processes_match_one(tmp_path):
    out = tmp_path / "stats.pt"
    mp.spawn(_worker, args=(f"file://{tmp_path / 'pg'}", str(out)), nprocs=2, join=True)
    reduced = torch.load(out, weights_only=True)
    single = tiny_stats()
    assert set(reduced) == set(single)
    for name, (xtx, tokens, absmax) in reduced.items():
        assert torch.equal(tokens, single[name].tokens)
        torch.testing.assert_close(xtx, single[name].xtx, rtol=1e-4, atol=1e-4)  # float32 sums, two orders
        torch.testing.assert_close(absmax, single[name].absmax)
