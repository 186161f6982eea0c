"""Momentum (EMA) copies of the modules that produce distillation targets.

The copies never receive gradients; after every optimizer step each copied parameter moves toward
its online twin: p_m = decay * p_m + (1 - decay) * p.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class MomentumCopies(nn.ModuleDict):
    """Frozen copies of named online modules, reachable as attributes (`copies.vision`).

    The modules are copied together so weights tied across them (the MLM head's output matrix and
    the text encoder's word embeddings) stay tied in the copies.
    """

    def __init__(self, online: dict[str, nn.Module]):
        super().__init__(copy.deepcopy(nn.ModuleDict(online)))
        self.requires_grad_(False)

    @torch.no_grad()
    def ema_update(self, online: dict[str, nn.Module], decay: float) -> None:
        if list(online) != list(self.keys()):
            raise ValueError(f"momentum update over {list(online)} but the copies are of {list(self.keys())}")
        sources = list(nn.ModuleDict(online).parameters())
        targets = list(self.parameters())
        if len(sources) != len(targets):
            raise RuntimeError(
                f"momentum copies hold {len(targets)} tensors but the online modules {len(sources)}; "
                "the online modules changed shape after the copies were made"
            )
        torch._foreach_lerp_(targets, [s.detach() for s in sources], 1.0 - decay)
