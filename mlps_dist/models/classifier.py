"""Multi-label patch classifier: backbone -> bn7 -> (PDA) -> dropout -> GAP -> 1x1 head.

Mirrors the public MLPS stage-1 network: Progressive Dropout Attention on the bn7 features,
then channel dropout (p=0.5), global average pooling and a bias-free 1x1 conv classifier.
The multi-label soft-margin loss belongs to the trainer.

Why the published PDA can destroy the model at its onset, and the fix
---------------------------------------------------------------------
The public attention is ``A = mean_c drop(relu(w_c . f))``: an *unnormalised* CAM whose
scale is that of the head weights times the features. By the time PDA switches on, the
head (trained at 10x/20x LR) has grown large, so ``A`` is far from 1 (values of 10-100 are
common): multiplying ``f`` by it scales every logit by that factor at once (the loss jumps),
and because ``A`` is not detached the gradient of the head also flows through ``A``, i.e.
grows with the square of the head's scale. At the still high LR a few such steps overshoot
until every class's CAM w_c . f is negative at every pixel. Then the ReLU'd attention is
exactly 0, and so are the re-weighted features, every logit and every gradient: the loss
sits at ln 2 = 0.6931 and nothing can recover (an absorbing state; in eval mode, without
PDA, every logit is negative, so validation F1 is 0).

``attention="normalised"`` (default) keeps what PDA is for (the *shape* of ``A``: pixels whose
CAM exceeds gamma x the peak get weight 0, the moderately activated rest keeps weights in
proportion to its CAM, so the loss must be carried by less discriminative regions) and
removes the two amplifiers: ``A`` is divided by its spatial mean per image, so the pooled
features keep their magnitude whatever the head's scale (GAP(f x A) is an A-weighted mean of
f), and it is detached, so the head's gradient does not feed back through its own CAMs.
An image whose CAMs are all 0 keeps weight 1 instead of losing its features, so the
absorbing state above does not exist.
``attention="public"`` reproduces the published behaviour exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ATTENTION_MODES = ("normalised", "public")


def dropped_cam_attention(features: torch.Tensor, head_weight: torch.Tensor, gamma: float) -> torch.Tensor:
    """The public attention map (B,1,H,W): the mean over the C classes of the CAMs
    relu(w_c . features) with every pixel above gamma x that CAM's per-image peak set to 0."""
    cams = F.relu(F.conv2d(features, head_weight))  # (B,C,H,W)
    peak = cams.flatten(2).amax(dim=2)[:, :, None, None]  # (B,C,1,1)
    dropped = torch.where(cams > gamma * peak, torch.zeros_like(cams), cams)
    return dropped.mean(dim=1, keepdim=True)  # a plain division by C


def progressive_dropout_attention(
    features: torch.Tensor, head_weight: torch.Tensor, gamma: float, attention: str = "public"
) -> torch.Tensor:
    """Re-weight ``features`` (B,K,H,W) by the mean of the classes' dropped CAMs.

    CAM_c = relu(w_c . features) from the current head weights ``head_weight`` (C,K,1,1).
    Pixels where CAM_c > gamma * max(CAM_c) (max per image) are set to 0, which moves the
    network's attention off the most discriminative regions; the features are multiplied by
    the mean of the C dropped CAMs.

    ``attention="public"``: that mean as it is, not detached (the loss also reaches the head
    and the features through the map), as in the public code. ``"normalised"``: the same map
    divided by its spatial mean per image (an image whose map is all 0 keeps weight 1) and
    detached; see the module docstring for why.
    """
    if attention == "public":
        return features * dropped_cam_attention(features, head_weight, gamma)
    if attention != "normalised":
        raise ValueError(
            f"unknown PDA attention '{attention}'; set classifier.pda.attention to one of {', '.join(ATTENTION_MODES)}"
        )
    # fp32 for the threshold and the normalisation: .float() alone is undone by an active autocast
    with torch.no_grad(), torch.autocast(features.device.type, enabled=False):
        amap = dropped_cam_attention(features.float(), head_weight.float(), gamma)
        level = amap.mean(dim=(2, 3), keepdim=True)
        amap = torch.where(level > 0, amap / level.clamp_min(torch.finfo(amap.dtype).tiny), torch.ones_like(amap))
    return features * amap.to(features.dtype)


class Classifier(nn.Module):
    """``forward(x) -> logits (B,C)``; ``forward_features(x) -> {layer: (B,K,H/8,W/8)}``.

    ``pda_gamma``: a float switches PDA on for training-mode forwards (the trainer sets it
    per epoch); None switches it off. In eval mode PDA never applies. ``pda_attention``:
    "normalised" | "public" (see the module docstring).
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        cam_layers: tuple[str, ...],
        dropout: float = 0.5,
        pda_attention: str = "normalised",
    ):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if pda_attention not in ATTENTION_MODES:
            raise ValueError(f"unknown PDA attention '{pda_attention}'; use one of {', '.join(ATTENTION_MODES)}")
        self.backbone = backbone
        self.num_classes = num_classes
        self.cam_layers = tuple(cam_layers)
        self.dropout7 = nn.Dropout2d(dropout)
        self.head = nn.Conv2d(backbone.out_channels, num_classes, 1, bias=False)
        nn.init.xavier_uniform_(self.head.weight)
        self.pda_gamma: float | None = None
        self.pda_attention = pda_attention

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The CAM layers of one forward pass, all stride 8 and in one autograd graph, so
        that Grad-CAM can differentiate a logit with respect to each of them."""
        return self.backbone(x)

    def logits_from_features(self, bn7: torch.Tensor) -> torch.Tensor:
        """GAP + head on bn7-like features (no PDA, no dropout): (B,K,h,w) -> (B,C)."""
        pooled = F.adaptive_avg_pool2d(bn7, 1)
        return self.head(pooled).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.backbone(x)["bn7"]
        if self.training and self.pda_gamma is not None:
            features = progressive_dropout_attention(
                features, self.head.weight, float(self.pda_gamma), self.pda_attention
            )
        features = self.dropout7(features)
        return self.logits_from_features(features)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters: backbone (base LR) and the from-scratch head (head_lr_mult);
        the optimizer splits each into weights and biases (parallel.optimizer_groups)."""
        return {
            "backbone": [p for p in self.backbone.parameters() if p.requires_grad],
            "head": [p for p in self.head.parameters() if p.requires_grad],
        }
