"""Multi-label patch classifier: backbone -> bn7 -> (PDA) -> dropout -> GAP -> 1x1 head.

Mirrors the public MLPS stage-1 network: Progressive Dropout Attention on the bn7 features,
then channel dropout (p=0.5), global average pooling and a bias-free 1x1 conv classifier.
The multi-label soft-margin loss belongs to the trainer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def progressive_dropout_attention(features: torch.Tensor, head_weight: torch.Tensor,
                                  gamma: float) -> torch.Tensor:
    """Re-weight ``features`` (B,K,H,W) by the mean of the classes' dropped CAMs.

    CAM_c = relu(w_c . features) from the current head weights ``head_weight`` (C,K,1,1).
    Pixels where CAM_c > gamma * max(CAM_c) (max per image) are set to 0, which moves the
    network's attention off the most discriminative regions; attention = the mean of the
    C dropped CAMs (a plain division by C, no further normalisation, as in the public code);
    the features are multiplied by it.

    Not detached, as in the public code: the loss also reaches the head and the features
    through the attention map. That is the behaviour the paper's results were obtained with;
    the threshold mask itself is piecewise constant and passes no gradient.
    """
    cams = F.relu(F.conv2d(features, head_weight))  # (B,C,H,W)
    peak = cams.flatten(2).amax(dim=2)[:, :, None, None]  # (B,C,1,1)
    dropped = torch.where(cams > gamma * peak, torch.zeros_like(cams), cams)
    attention = dropped.mean(dim=1, keepdim=True)  # mean over the C classes
    return features * attention


class Classifier(nn.Module):
    """``forward(x) -> logits (B,C)``; ``forward_features(x) -> {layer: (B,K,H/8,W/8)}``.

    ``pda_gamma``: a float switches PDA on for training-mode forwards (the trainer sets it
    per epoch); None switches it off. In eval mode PDA never applies.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, cam_layers: tuple[str, ...], dropout: float = 0.5):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.backbone = backbone
        self.num_classes = num_classes
        self.cam_layers = tuple(cam_layers)
        self.dropout7 = nn.Dropout2d(dropout)
        self.head = nn.Conv2d(backbone.out_channels, num_classes, 1, bias=False)
        nn.init.xavier_uniform_(self.head.weight)
        self.pda_gamma: float | None = None

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
            features = progressive_dropout_attention(features, self.head.weight, float(self.pda_gamma))
        features = self.dropout7(features)
        return self.logits_from_features(features)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters: backbone (base LR) and the from-scratch head (10x LR)."""
        return {"backbone": [p for p in self.backbone.parameters() if p.requires_grad],
                "head": [p for p in self.head.parameters() if p.requires_grad]}
