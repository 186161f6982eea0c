"""The pretraining forward: one batch of image-text pairs through ITC, ITM, MLM and PrefixLM, and
for mPLUG-2 one batch of video-text pairs through the same four objectives (VTC, VTM, MLM,
PrefixLM on the video states).

`MPLUGPretraining` wraps the model with the ITC queues (one for images, one for videos: their
features are compared only within their own modality) and returns every enabled loss, the video
ones prefixed `video_`, and their unweighted sum. The trainer calls `after_optimizer_step()` after
each optimizer step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from pretrain.config.schema import Config
from pretrain.models.factory import build_mplug
from pretrain.models.mplug import MPLUG, encode_visual, image_feature, text_feature
from pretrain.objectives.batch_draws import BatchDraws
from pretrain.objectives.distributed import rank, world_size
from pretrain.objectives.itc import NO_ID, FeatureQueue, ITCInputs, itc_loss
from pretrain.objectives.itm import ITMInputs, itm_loss
from pretrain.objectives.mlm import mask_tokens, mlm_loss
from pretrain.objectives.prefix_lm import prefix_lm_loss, split_prefix

OBJECTIVES = ("itc", "itm", "mlm", "prefix_lm")
VIDEO_PREFIX = "video_"  # the video batch's losses: video_itc (VTC), video_itm (VTM), video_mlm, video_prefix_lm
VIDEO_SEED_OFFSET = 7919  # the video batch's masking and prefix draws come from their own stream


@dataclass
class PretrainOutput:
    loss: torch.Tensor  # the sum of the enabled losses
    losses: dict[str, torch.Tensor] = field(default_factory=dict)  # objective -> loss
    alpha: float = 0.0


def needs_momentum(config: Config) -> bool:
    """Whether the objectives use the momentum copies (ITC's and distillation's targets)."""
    return config.objectives.itc or config.objectives.distill


class MPLUGPretraining(nn.Module):
    def __init__(self, config: Config, model: MPLUG | None = None):
        super().__init__()
        self.config = config
        self.objectives = config.objectives
        if not any(getattr(self.objectives, name) for name in OBJECTIVES):
            raise ValueError(f"every pretraining objective is switched off; enable one of {', '.join(OBJECTIVES)}")
        momentum = needs_momentum(config)
        self.model = model if model is not None else build_mplug(config.model, momentum=momentum)
        if momentum and self.model.momentum is None:
            raise ValueError("ITC and distillation need the momentum copies; build MPLUG with momentum=True")
        self.queue = FeatureQueue(config.model.embed_dim, config.model.queue_size)
        # Video models (mPLUG-2: temporal modules in the ViT) also pretrain on clips, with their own queue.
        self.video_queue = (FeatureQueue(config.model.embed_dim, config.model.queue_size)
                            if config.model.video.temporal else None)

    def alpha(self, step: int) -> float:
        """The distillation weight at `step`: ramped linearly from 0 to `alpha` over the warmup."""
        obj = self.objectives
        if not obj.distill:
            return 0.0
        return obj.alpha * min(1.0, step / max(1, obj.alpha_warmup_steps))

    def after_optimizer_step(self) -> None:
        self.model.after_optimizer_step()

    def forward(
        self,
        images: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_ids: torch.Tensor | None = None,
        step: int = 0,
        micro: int = 0,
        video: dict[str, torch.Tensor] | None = None,
    ) -> PretrainOutput:
        """images (B, 3, H, W); input_ids, attention_mask (B, L) as `[CLS] caption [SEP] [PAD]..`.

        `video`, when given, is a batch of clips: "images" (Bv, T, 3, H, W), "input_ids" and
        "attention_mask" (Bv, L) and optionally "image_ids" (Bv,), the clip ids. `step` and
        `micro` (the micro-batch within the step) seed the masking and prefix draws.
        """
        alpha = self.alpha(step)
        seed = self.config.train.seed
        draws = BatchDraws.for_step(seed, step, micro, rank(), world_size())
        losses = self.pair_losses(images, input_ids, attention_mask, image_ids, self.queue, draws, alpha)
        if video is not None:
            if self.video_queue is None:
                raise ValueError(
                    "a video batch reached a model without temporal modules (model.video.temporal is false); "
                    "pretrain on videos with an mPLUG-2 config (mplug2_tiny, mplug2_base, mplug2_large) or "
                    "--set model.video.temporal=true"
                )
            draws = BatchDraws.for_step(seed + VIDEO_SEED_OFFSET, step, micro, rank(), world_size())
            video_losses = self.pair_losses(video["images"], video["input_ids"], video["attention_mask"],
                                            video.get("image_ids"), self.video_queue, draws, alpha)
            losses.update({VIDEO_PREFIX + name: loss for name, loss in video_losses.items()})
        total = torch.stack(list(losses.values())).sum()
        return PretrainOutput(loss=total, losses=losses, alpha=alpha)

    def pair_losses(
        self,
        pixels: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_ids: torch.Tensor | None,
        queue: FeatureQueue,
        draws: BatchDraws,
        alpha: float,
    ) -> dict[str, torch.Tensor]:
        """The enabled objectives over one batch of pairs; `pixels` are images or video clips."""
        obj, model, text_cfg = self.objectives, self.model, self.config.model.text
        losses: dict[str, torch.Tensor] = {}
        vision = model.encode_image(pixels)  # (B, Lv, D)
        vision_m = None
        if obj.itc or (obj.mlm and alpha > 0):
            with torch.no_grad():
                vision_m = encode_visual(model.momentum, pixels)  # (B, Lv, D)

        if obj.itc or obj.itm:
            text = model.encode_text(input_ids, attention_mask)  # (B, Lt, D)
            image_feat, text_feat = image_feature(model, vision), text_feature(model, text)
            temp = model.temperature()
        if obj.itc:
            with torch.no_grad():
                momentum = model.momentum
                image_feat_m = image_feature(momentum, vision_m)
                text_feat_m = text_feature(momentum, momentum.text_encoder(input_ids, attention_mask))
            itc = itc_loss(ITCInputs(image_feat, text_feat, image_feat_m, text_feat_m, temp, alpha, image_ids), queue)
            losses["itc"] = itc.loss
            ids = image_ids if image_ids is not None else torch.full_like(input_ids[:, 0], NO_ID)
            queue.enqueue(image_feat_m, text_feat_m, ids)
        if obj.itm:
            itm = itm_loss(
                ITMInputs(vision, text, attention_mask, image_feat.detach(), text_feat.detach(), temp.detach(), image_ids),
                model.fuse,
                model.itm_head,
            )
            losses["itm"] = itm.loss
        if obj.mlm:
            masked = mask_tokens(
                input_ids,
                vocab_size=text_cfg.vocab_size,
                mask_id=text_cfg.mask_id,
                special_ids=(text_cfg.pad_id, text_cfg.cls_id, text_cfg.sep_id, text_cfg.mask_id),
                probability=obj.mlm_probability,
                mask_ratio=obj.mlm_mask_ratio,
                random_ratio=obj.mlm_random_ratio,
                draws=draws,
            )
            fused = model.fuse(model.encode_text(masked.input_ids, attention_mask), attention_mask, vision)
            logits = model.mlm_head(fused.text)  # (B, L, V)
            soft_logits = None
            if alpha > 0:
                with torch.no_grad():
                    m = model.momentum
                    fused_m = m.fusion(m.text_encoder(masked.input_ids, attention_mask), attention_mask, vision_m)
                    soft_logits = m.mlm_head(fused_m.text)
            losses["mlm"] = mlm_loss(logits, masked.labels, soft_logits, alpha)
        if obj.prefix_lm:
            split = split_prefix(input_ids, attention_mask, cls_id=text_cfg.cls_id, pad_id=text_cfg.pad_id, draws=draws)
            prefix = model.fuse(model.encode_text(input_ids, split.prefix_mask), split.prefix_mask, vision)
            memory_mask = torch.cat([torch.ones_like(vision[:, :, 0], dtype=torch.long), split.prefix_mask], dim=1)
            logits = model.decode(split.decoder_ids, split.decoder_mask, prefix.joint(), memory_mask)
            losses["prefix_lm"] = prefix_lm_loss(logits, split.labels)
        return losses
