"""Train ResNet-50 on ImageNet with KFAC; single process or multi-GPU with torchrun + DDP.

    python examples/train_imagenet.py --data-root /data/imagenet   # train/, val/ inside
    torchrun --nproc-per-node 8 examples/train_imagenet.py --data-root /data/imagenet
    python examples/train_imagenet.py --fake-data --epochs 1 --limit-batches 2 --batch-size 8 \\
        --image-size 64

Under torchrun every process computes Kronecker factors on its own batch; KFAC averages them
across processes (bucketed, overlapping the backward pass) and spreads the inversions over ranks.
"""

import argparse
import datetime
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
from torchvision import transforms as T

from kfac_tn import KFAC

p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
)
p.add_argument("--data-root", default="/data/imagenet")
p.add_argument("--fake-data", action="store_true", help="torchvision FakeData (offline smoke test)")
p.add_argument("--epochs", type=int, default=55)
p.add_argument("--batch-size", type=int, default=64, help="per process")
p.add_argument("--lr", type=float, default=0.2)
p.add_argument("--image-size", type=int, default=224)
p.add_argument("--limit-batches", type=int, default=None)
p.add_argument("--workers", type=int, default=8)
args = p.parse_args()

distributed = "RANK" in os.environ
if distributed:
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=10))
    rank, world = dist.get_rank(), dist.get_world_size()
else:
    rank, world = 0, 1
local_rank = int(os.environ.get("LOCAL_RANK", 0))
device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
if device.type == "cuda":
    torch.cuda.set_device(device)
torch.manual_seed(0)

s = args.image_size
norm = T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
train_tf = T.Compose([T.RandomResizedCrop(s), T.RandomHorizontalFlip(), T.ToTensor(), norm])
test_tf = T.Compose([T.Resize(round(s * 256 / 224)), T.CenterCrop(s), T.ToTensor(), norm])
if args.fake_data:
    train_set = torchvision.datasets.FakeData(256, (3, s, s), 1000, train_tf)
    test_set = torchvision.datasets.FakeData(64, (3, s, s), 1000, test_tf, random_offset=10**6)
else:
    train_set = torchvision.datasets.ImageFolder(os.path.join(args.data_root, "train"), train_tf)
    test_set = torchvision.datasets.ImageFolder(os.path.join(args.data_root, "val"), test_tf)
sampler = torch.utils.data.DistributedSampler(train_set) if distributed else None
loader = torch.utils.data.DataLoader(
    train_set,
    args.batch_size,
    shuffle=sampler is None,
    sampler=sampler,
    drop_last=True,
    num_workers=args.workers,
    pin_memory=True,
)
test_loader = torch.utils.data.DataLoader(test_set, 250, num_workers=args.workers)

model = torchvision.models.resnet50().to(device)
# KFAC hooks the plain module; DDP wraps the same module for gradient averaging
opt = KFAC(
    model,
    lr=args.lr,
    momentum=0.9,
    weight_decay=5e-5,
    damping=1e-3,
    factor_decay=0.95,
    kfac_approx="reduce",
    factor_update_period=10,
    inverse_update_period=100,
    kl_clip=1e-3,
)
train_model = model
if distributed:
    ids = [local_rank] if device.type == "cuda" else None
    train_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
steps = args.epochs * min(len(loader), args.limit_batches or len(loader))
sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps, pct_start=0.1)

for epoch in range(args.epochs):
    if sampler is not None:
        sampler.set_epoch(epoch)
    train_model.train()
    t0, seen = time.perf_counter(), 0
    for i, (x, y) in enumerate(loader):
        if args.limit_batches and i >= args.limit_batches:
            break
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        opt.zero_grad()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = F.cross_entropy(train_model(x).float(), y)
        loss.backward()
        opt.step()
        sched.step()
        seen += len(x) * world
    if rank == 0:  # evaluation on rank 0 only, for brevity
        model.eval()
        correct = total = 0
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
            for x, y in test_loader:
                correct += (model(x.to(device)).argmax(1).cpu() == y).sum().item()
                total += len(y)
        print(
            f"epoch {epoch + 1}: loss {loss.item():.3f}, top-1 {correct / total:.4f}, "
            f"{seen / (time.perf_counter() - t0):.0f} img/s"
        )
if distributed:
    dist.destroy_process_group()
