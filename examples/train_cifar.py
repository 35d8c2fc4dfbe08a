"""Train a CIFAR-10/100 ResNet-18 (CIFAR stem) with KFAC in a plain PyTorch loop.

    python examples/train_cifar.py --data-root ~/data --download          # real CIFAR-10
    python examples/train_cifar.py --fake-data --epochs 1 --limit-batches 5   # smoke test, offline

KFAC-reduce keeps the Kronecker factors of the 3x3 convolutions cheap; factors are refreshed every
10 steps and inverted every 100 (typical large-scale settings). Swap in --sgd to compare.
"""

import argparse
import time

import torch
import torch.nn.functional as F
import torchvision
from torchvision import transforms as T

from kfac_tn import KFAC

p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
)
p.add_argument("--data-root", default="~/data")
p.add_argument("--dataset", choices=["cifar10", "cifar100"], default="cifar10")
p.add_argument("--download", action="store_true")
p.add_argument(
    "--fake-data",
    action="store_true",
    help="torchvision FakeData instead of CIFAR (offline smoke test)",
)
p.add_argument("--epochs", type=int, default=30)
p.add_argument("--batch-size", type=int, default=128)
p.add_argument("--lr", type=float, default=0.1)
p.add_argument(
    "--limit-batches", type=int, default=None, help="stop each epoch after this many batches"
)
p.add_argument("--sgd", action="store_true")
p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
p.add_argument("--workers", type=int, default=4)
args = p.parse_args()
torch.manual_seed(0)

mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
train_tf = T.Compose(
    [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)]
)
test_tf = T.Compose([T.ToTensor(), T.Normalize(mean, std)])
num_classes = 100 if args.dataset == "cifar100" else 10
if args.fake_data:
    train_set = torchvision.datasets.FakeData(512, (3, 32, 32), num_classes, train_tf)
    test_set = torchvision.datasets.FakeData(
        128, (3, 32, 32), num_classes, test_tf, random_offset=10**6
    )
else:
    cls = (
        torchvision.datasets.CIFAR100
        if args.dataset == "cifar100"
        else torchvision.datasets.CIFAR10
    )
    train_set = cls(args.data_root, train=True, transform=train_tf, download=args.download)
    test_set = cls(args.data_root, train=False, transform=test_tf, download=args.download)
loader = torch.utils.data.DataLoader(
    train_set, args.batch_size, shuffle=True, drop_last=True, num_workers=args.workers
)
test_loader = torch.utils.data.DataLoader(test_set, 1000, num_workers=args.workers)

model = torchvision.models.resnet18(num_classes=num_classes)
model.conv1 = torch.nn.Conv2d(3, 64, 3, padding=1, bias=False)  # CIFAR stem
model.maxpool = torch.nn.Identity()
model.to(args.device)

if args.sgd:
    opt = torch.optim.SGD(
        model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4
    )
else:
    opt = KFAC(
        model,
        lr=args.lr,
        momentum=0.9,
        weight_decay=5e-4,
        damping=3e-3,
        kfac_approx="reduce",
        factor_update_period=10,
        inverse_update_period=100,
        kl_clip=1e-3,
    )
steps = args.epochs * min(len(loader), args.limit_batches or len(loader))
sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps, pct_start=0.15)

for epoch in range(args.epochs):
    model.train()
    t0, seen = time.perf_counter(), 0
    for i, (x, y) in enumerate(loader):
        if args.limit_batches and i >= args.limit_batches:
            break
        x, y = x.to(args.device, non_blocking=True), y.to(args.device, non_blocking=True)
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        sched.step()
        seen += len(x)
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in test_loader:
            pred = model(x.to(args.device)).argmax(1).cpu()
            correct, total = correct + (pred == y).sum().item(), total + len(y)
    print(
        f"epoch {epoch + 1}: last loss {loss.item():.3f}, test acc {correct / total:.4f}, "
        f"{seen / (time.perf_counter() - t0):.0f} img/s"
    )
