"""Quickstart: KFAC in an ordinary PyTorch training loop, offline (scikit-learn's 8x8 digits).

    python examples/quickstart.py            # a few seconds on a laptop CPU (>98% test accuracy)
    OMP_NUM_THREADS=1 python examples/quickstart.py   # faster on a busy/small CPU
    python examples/quickstart.py --sgd      # same loop with torch.optim.SGD, for comparison

The only KFAC-specific line is the optimizer's construction: it hooks the model's Linear/Conv
layers itself, so zero_grad / backward / step stay exactly as with SGD.
"""

import argparse
import time

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from kfac_tn import KFAC

parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
)
parser.add_argument("--epochs", type=int, default=5)
parser.add_argument("--batch-size", type=int, default=64)
parser.add_argument("--sgd", action="store_true", help="use torch.optim.SGD instead of KFAC")
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()
torch.manual_seed(args.seed)

# data: 1797 8x8 grey images, fixed stratified split, standardised
digits = load_digits()
x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16  # [1797, 1, 8, 8]
y = torch.tensor(digits.target)
i_train, i_test = train_test_split(
    range(len(y)), test_size=360, random_state=0, stratify=digits.target
)
x = (x - x[i_train].mean()) / x[i_train].std()
train_set = torch.utils.data.TensorDataset(x[i_train], y[i_train])
loader = torch.utils.data.DataLoader(
    train_set, batch_size=args.batch_size, shuffle=True, drop_last=True
)

model = nn.Sequential(
    nn.Conv2d(1, 32, 3, padding=1),
    nn.ReLU(),
    nn.Conv2d(32, 64, 3, padding=1),
    nn.ReLU(),
    nn.MaxPool2d(2),
    nn.Conv2d(64, 64, 3, padding=1),
    nn.ReLU(),
    nn.AdaptiveAvgPool2d(2),
    nn.Flatten(),
    nn.Linear(256, 10),
)

if args.sgd:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
else:
    optimizer = KFAC(model, lr=0.05, weight_decay=5e-4)  # the rest: defaults, self-tuning

start = time.perf_counter()
for epoch in range(1, args.epochs + 1):
    model.train()
    for xb, yb in loader:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        logits = model(x[i_test])
        acc = (logits.argmax(1) == y[i_test]).float().mean().item()
        test_loss = F.cross_entropy(logits, y[i_test]).item()
    print(
        f"epoch {epoch}: test loss {test_loss:.4f}, test accuracy {acc:.4f} "
        f"({time.perf_counter() - start:.1f} s)"
    )
