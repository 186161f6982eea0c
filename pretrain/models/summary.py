"""Parameter counts of a configured model, built on the meta device so no memory is allocated."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from pretrain.config.schema import Config
from pretrain.models.mplug import MODULE_GROUPS, MPLUG


@dataclass
class ModelSummary:
    name: str
    total_params: int  # online parameters; momentum copies are not counted here
    params_by_module: dict[str, int]
    momentum_params: int
    fusion_pattern: list[str]

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(config: Config) -> ModelSummary:
    with torch.device("meta"):
        model = MPLUG(config.model, momentum=True)
    seen: set[int] = set()  # a tied tensor counts once, in the first group that holds it
    by_module: dict[str, int] = {}
    for group, attributes in MODULE_GROUPS.items():
        count = 0
        for attribute in attributes:
            part = getattr(model, attribute)
            params = [part] if isinstance(part, torch.nn.Parameter) else list(part.parameters())
            for p in params:
                if id(p) not in seen:
                    seen.add(id(p))
                    count += p.numel()
        by_module[group] = count
    momentum = sum(p.numel() for p in model.momentum.parameters())
    online = sum(p.numel() for p in model.parameters()) - momentum
    if online != sum(by_module.values()):
        raise RuntimeError(f"parameter groups cover {sum(by_module.values())} of {online} parameters; update MODULE_GROUPS")
    return ModelSummary(
        name=config.name,
        total_params=online,
        params_by_module=by_module,
        momentum_params=momentum,
        fusion_pattern=list(model.fusion.pattern),
    )


def format_summary(summary: ModelSummary) -> str:
    width = max(len(k) for k in summary.params_by_module) + 2
    lines = [f"model {summary.name}"]
    for module, count in summary.params_by_module.items():
        lines.append(f"  {module:<{width}}{count:>15,}  ({count / 1e6:8.1f}M)")
    lines.append(f"  {'total':<{width}}{summary.total_params:>15,}  ({summary.total_params / 1e6:8.1f}M)")
    lines.append(f"  {'momentum':<{width}}{summary.momentum_params:>15,}  (EMA copies, not in the total)")
    lines.append(f"  fusion pattern: {', '.join(summary.fusion_pattern)}")
    return "\n".join(lines)
