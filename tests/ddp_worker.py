"""One rank of the DDP test (tests/test_production.py), and the single-process run it is compared with.

    python tests/ddp_worker.py RANK WORLD PORT MODE OUT_DIR [ddp|fsdp2|push]
"""
import os
import sys
from datetime import timedelta

import torch
import torch.nn as nn
import torch.nn.functional as F

import dsd_fx

MODES = {
    "mask": {"sparsity": 0.5},
    "nm-fixed": {"pattern": "2:4"},
    "sr-ste": {"pattern": "2:4", "method": "sr-ste"},
    "packed": {"pattern": "2:4", "pack": True},
}
# the same model captured through torch.export (an aten graph): the DDP test only
CAPTURED = {"export": {"sparsity": 0.5, "capture": "export", "example_args": (torch.randn(2, 16),)}}
STEPS, GLOBAL_BATCH = 4, 8


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


def train(mode: str, rank: int = 0, world: int = 1, wrap=lambda m: m):
    """STEPS steps of SGD on the same global batches; each rank takes its slice."""
    sparse = dsd_fx.transform(make_model(), **(MODES.get(mode) or CAPTURED[mode]))
    net = wrap(sparse)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        x, y = torch.randn(GLOBAL_BATCH, 16, generator=g), torch.randn(GLOBAL_BATCH, 4, generator=g)
        xs, ys = x.chunk(world)[rank], y.chunk(world)[rank]
        opt.zero_grad()
        F.mse_loss(net(xs), ys).backward()
        opt.step()
    return sparse


def train_push(rank: int = 0, world: int = 1, wrap=lambda m: m, sync: bool = False, local: int = 1):
    """STEPS steps of cross-entropy + push_loss on the tapped classifier input, the same global
    batches; each rank takes its slice (sync: the push loss of the global batch). `local` > 1 (one
    process): the mean of the losses of that many slices, which is what DDP without sync computes."""
    torch.manual_seed(0)
    tapped = dsd_fx.transform(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)), phase="push")
    net = wrap(tapped)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        x, y = torch.randn(GLOBAL_BATCH, 16, generator=g), torch.randint(0, 4, (GLOBAL_BATCH,), generator=g)
        xs, ys = x.chunk(world)[rank], y.chunk(world)[rank]
        opt.zero_grad()
        losses = [F.cross_entropy(net(xl), yl) + dsd_fx.push_loss(tapped, yl, sync=sync)
                  for xl, yl in zip(xs.chunk(local), ys.chunk(local))]
        torch.stack(losses).mean().backward()
        opt.step()
    return tapped


def push_values(rank: int, world: int) -> tuple[float, float]:
    """(the synced push loss of an uneven split, 5 and 3 rows, of one batch; the one-process loss of it)."""
    torch.manual_seed(0)
    tapped = dsd_fx.transform(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)), phase="push")
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(GLOBAL_BATCH, 16, generator=g), torch.randint(0, 4, (GLOBAL_BATCH,), generator=g)
    whole = (tapped(x), dsd_fx.push_loss(tapped, y))[1]
    part = slice(0, 5) if rank == 0 else slice(5, None)
    synced = (tapped(x[part]), dsd_fx.push_loss(tapped, y[part], sync=True))[1]
    return float(synced), float(whole)


def main() -> None:
    rank, world, port, mode, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
    how = sys.argv[6] if len(sys.argv) > 6 else "ddp"
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        if how == "fsdp2":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh("cpu", (world,))
            sparse = train(mode, rank, world, wrap=lambda m: fully_shard(m, mesh=mesh))
            params = {n: p.full_tensor() if hasattr(p, "full_tensor") else p.detach() for n, p in sparse.named_parameters()}
            masks = {n[: -len("_mask")]: b.detach().clone() for n, b in sparse.named_buffers() if n.endswith("_mask")}
            torch.save({"masks": masks, "params": params}, os.path.join(out, f"rank{rank}.pt"))
            dist.barrier()
            return
        from torch.nn.parallel import DistributedDataParallel as DDP

        if how == "push":
            tapped = train_push(rank, world, wrap=DDP, sync=True)
            torch.save({"params": {n: p.detach().clone() for n, p in tapped.named_parameters()},
                        "values": push_values(rank, world)}, os.path.join(out, f"rank{rank}.pt"))
            dist.barrier()
            return

        sparse = train(mode, rank, world, wrap=DDP)
        state = {"masks": dsd_fx.current_masks(sparse),
                 "params": {n: p.detach().clone() for n, p in sparse.named_parameters()}}
        if rank == 0:
            dense = dsd_fx.transform(sparse, phase="dense")
            report = dsd_fx.verify_zero_overhead(make_model(), dense, (torch.randn(2, 16),), latency_runs=2)
            state["proof"] = report.ok
        torch.save(state, os.path.join(out, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # the work is done and saved, the process group destroyed: leave without C++ static teardown, where
    # gloo's threads under FSDP2 now and then abort ("terminate called without an active exception",
    # about 1 run in 7 on a 2-core machine) after everything the test reads was written
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
