"""Two-process (gloo, CPU) DDP run of ADMMScheduler; each rank writes its Z/U/weights to OUT/rank{r}.safetensors.

Usage: python tests/_ddp_admm_script.py OUT_DIR [FORMAT]   (spawns the 2 processes itself)

After the steps every rank decomposes (``sched.compress``) and writes the TN weights too (TR:
from the warm-started cores, which rank 0 computed and broadcast).
"""
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn


def worker(rank, world, out, port, fmt):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    import tn_hf
    from tn_hf.admm import ADMMScheduler
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64),
                          nn.ReLU(), nn.Linear(64, 4))
    ddp = nn.parallel.DistributedDataParallel(model)
    sched = ADMMScheduler(ddp, tn_hf.TNConfig(format=fmt, ranks=3, min_params=2000), rho=1e-2, update_every=2)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(100 + rank)  # different data per rank
    for _ in range(6):
        x, y = torch.randn(8, 16, generator=g), torch.randint(0, 4, (8,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(ddp(x), y).backward()
        sched.prox_grad_()
        opt.step()
        sched.step()
    from safetensors.torch import save_file
    sd = sched.state_dict()
    flat = {f"{kind}.{k}": v.contiguous() for kind in ("Z", "U", "Zprev") for k, v in sd[kind].items()}
    flat.update({f"W.{k}": v.detach().contiguous() for k, v in model.state_dict().items()})
    flat["meta.updates"] = torch.tensor(float(sched.updates))
    sched.compress(model, progress=False)
    flat.update({f"TN.{k}": v.detach().clone() for k, v in model.state_dict().items() if "cores" in k})
    save_file(flat, os.path.join(out, f"rank{rank}.safetensors"))
    dist.destroy_process_group()


if __name__ == "__main__":
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(2, sys.argv[1], port, sys.argv[2] if len(sys.argv) > 2 else "tt"), nprocs=2, join=True)
