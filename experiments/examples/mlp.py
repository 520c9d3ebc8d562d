"""An example for ``target=module``: your own trained model and data, decomposed from the command line.

    python -m experiments.decompose target=module \\
        target.factory=experiments.examples.mlp:trained_mlp target.data=experiments.examples.mlp:batch \\
        'target.decompose=[0,2]' method.C=6 method.topk=2 method.steps=500 figures=false

``trained_mlp`` returns the network (here a small MLP trained in about a second on a sparse toy task,
so the example needs no files); ``batch(batch_size, generator)`` returns a batch of its inputs. Any
importable functions with these signatures work: ``factory_kwargs`` and ``data_kwargs`` are passed on.
"""

import torch
from torch import Tensor, nn


def batch(batch_size: int, generator: torch.Generator | None, n_inputs: int = 8, p: float = 0.2) -> Tensor:
    """Sparse inputs: each of ``n_inputs`` features is on with probability ``p``, uniform in [0, 1]."""
    on = torch.rand(batch_size, n_inputs, generator=generator) < p
    return torch.rand(batch_size, n_inputs, generator=generator) * on


def trained_mlp(n_inputs: int = 8, hidden: int = 16, steps: int = 300, seed: int = 0) -> nn.Module:
    """An MLP trained to output ReLU(x) of every feature and their sum (deterministic given ``seed``)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(n_inputs, hidden), nn.ReLU(), nn.Linear(hidden, n_inputs + 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = batch(256, gen, n_inputs)
        target = torch.cat([x, x.sum(-1, keepdim=True)], -1)
        loss = (model(x) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()
