"""Masks agree on every rank of DistributedDataParallel: 2 gloo processes on CPU, each
with its own data, so only decisions made from synchronized data can agree."""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from sparsetorch.training import SET, SRSTE, RigL, Sparsifier, SRigL
from training_helpers import OPTIMIZERS, batch, mlp

SCHEDULES = {
    "rigl": (RigL(sparsity=0.75, end=10, every=2), {"distribution": "erk"}),
    "set": (SET(sparsity=0.75, end=10, every=2), {}),
    "srigl": (SRigL(sparsity=0.75, end=10, every=2, gamma=0.6), {}),
    "srste": (SRSTE(), {"pattern": "2:4"}),
}
WORLD = 2


def _worker(rank: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    results = {}
    for name, (schedule, kwargs) in SCHEDULES.items():
        model = mlp(seed=0)
        opt = OPTIMIZERS["sgd-momentum-wd"](model.parameters())
        sparsifier = Sparsifier(model, schedule, optimizer=opt, seed=0, **kwargs)
        ddp = DistributedDataParallel(model, broadcast_buffers=False)  # masks are never copied from rank 0
        for step in range(7):
            x, y = batch(step * WORLD + rank)  # every rank sees other data
            F.cross_entropy(ddp(x), y).backward()
            opt.step()
            sparsifier.step()
            opt.zero_grad()
        results[name] = {"masks": sparsifier.masks(), "weights": [p.detach().clone() for p in model.parameters()]}
    torch.save(results, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_masks_and_weights_are_identical_on_every_rank(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD)]
    for name in SCHEDULES:
        first, other = ranks[0][name], ranks[1][name]
        for layer, mask in first["masks"].items():
            assert torch.equal(mask, other["masks"][layer]), f"{name}: masks of {layer} differ between ranks"
        schedule, kwargs = SCHEDULES[name]
        model = mlp(seed=0)
        start = Sparsifier(model, schedule, optimizer=OPTIMIZERS["adamw"](model.parameters()), seed=0, **kwargs).masks()
        assert any(not torch.equal(start[k], mask) for k, mask in first["masks"].items()), f"{name}: masks never moved"
        for a, b in zip(first["weights"], other["weights"]):
            assert torch.equal(a, b), f"{name}: weights differ between ranks"
