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


def parameter_group(name: str, prefixes: dict[str, str]) -> str | None:
    """The group whose prefix is the longest one `name` starts with, as a whole dotted part."""
    matches = [p for p in prefixes if name == p or name.startswith(p + ".")]
    return prefixes[max(matches, key=len)] if matches else None


def resolve_attribute(model: torch.nn.Module, dotted: str) -> object | None:
    """The module or parameter at a dotted attribute path, or None where the model has none."""
    part: object | None = model
    for attribute in dotted.split("."):
        part = getattr(part, attribute, None)
    return part


def summarize(config: Config) -> ModelSummary:
    with torch.device("meta"):
        model = MPLUG(config.model, momentum=True)
    prefixes = {prefix: group for group, attributes in MODULE_GROUPS.items() for prefix in attributes}
    present = [group for group, attributes in MODULE_GROUPS.items()
               if any(resolve_attribute(model, attribute) is not None for attribute in attributes)]
    by_module = dict.fromkeys(present, 0)
    # named_parameters gives a tied tensor once, under its first name, so it counts in one group.
    for name, p in model.named_parameters():
        if name.startswith("momentum."):
            continue
        group = parameter_group(name, prefixes)
        if group is None:
            raise RuntimeError(f"parameter {name} is in no group of MODULE_GROUPS; update MODULE_GROUPS")
        by_module[group] += p.numel()
    momentum = sum(p.numel() for p in model.momentum.parameters())
    online = sum(p.numel() for p in model.parameters()) - momentum
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
