"""Train the example's teacher and save its weights: ``python train_teacher.py`` (a few seconds
on a CPU) writes ``small_cnn.pt``, the ``model.checkpoint`` of config.yaml.

In a real project this step is whatever produced your trained model; granq_search only needs
the architecture (``mymodels:small_cnn``) and a state dict saved with
``torch.save(model.state_dict(), PATH)``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from mydata import teacher_train_set
from mymodels import MEAN, STD, SmallCNN, small_cnn


def train_teacher(epochs: int = 20, seed: int = 0) -> SmallCNN:
    """SmallCNN trained on the teacher part of the digits (Adam, one-cycle schedule), in eval mode."""
    torch.manual_seed(seed)
    data = teacher_train_set(MEAN, STD)
    loader = torch.utils.data.DataLoader(data, batch_size=64, shuffle=True,
                                         generator=torch.Generator().manual_seed(seed))
    model = small_cnn(num_classes=10)
    opt = torch.optim.Adam(model.parameters(), lr=0.01, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.01, total_steps=epochs * len(loader))
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--output", default=str(Path(__file__).with_name("small_cnn.pt")))
    args = p.parse_args(argv)
    model = train_teacher(args.epochs)
    out = Path(args.output)
    torch.save(model.state_dict(), out)
    print(f"teacher weights written to {out}")
    return out


if __name__ == "__main__":
    main()
