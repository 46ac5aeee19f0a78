"""Model classes of the recipes, registered with timm (``resnet{20,32,44,56,110}_cifar``,
``lstm_video_classifier``) so that a saved recipe checkpoint reloads like any timm model --
``tn_hf.from_pretrained(dir)`` or ``timm.create_model("local-dir:DIR", pretrained=True)`` --
once this module is imported. ``videomae`` builds a transformers video classifier.
"""
from __future__ import annotations

import functools

import torch.nn as nn
import torch.nn.functional as F

from .data import CIFAR_MEAN, CIFAR_STD


def register_timm_model(name: str, cls, **default_cfg):
    """Register ``cls(**kwargs)`` with timm as ``name`` (once); the constructor kwargs are kept as
    ``model.model_args`` (written to config.json on save)."""
    from timm.models import register_model
    from timm.models._registry import _model_entrypoints

    if name in _model_entrypoints:
        return

    def entrypoint(pretrained=False, pretrained_cfg=None, pretrained_cfg_overlay=None, cache_dir=None, **kwargs):
        m = cls(**kwargs)
        m.model_args = dict(kwargs)
        m.pretrained_cfg = m.default_cfg = {"architecture": name, "num_classes": m.num_classes, **default_cfg}
        if pretrained:  # "local-dir:DIR" / "hf-hub:..." checkpoints go through timm's loader (tn_hf hooks it)
            from timm.models import _builder
            cfg = pretrained_cfg.to_dict() if hasattr(pretrained_cfg, "to_dict") else dict(pretrained_cfg or {})
            cfg.update(pretrained_cfg_overlay or {})
            _builder.load_pretrained(m, pretrained_cfg=cfg, num_classes=m.num_classes, cache_dir=cache_dir)
        return m

    entrypoint.__name__ = name
    entrypoint.__module__ = __name__
    register_model(entrypoint)


# ----------------------------------------------------------------------------- CIFAR ResNets
class _Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:  # projection shortcut (1x1 conv)
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """He et al. CIFAR ResNet-(6n+2): 3x3 stem, 3 stages of n BasicBlocks with 16/32/64 channels.

    Args:
        depth: 6n+2 (20, 32, 44, 56, 110).
        num_classes: classifier outputs.
        in_chans: input channels.
    """

    def __init__(self, depth=20, num_classes=10, in_chans=3, **_):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CifarResNet depth={depth}: must be 6n+2 (20, 32, 44, 56, 110)")
        n = (depth - 2) // 6
        self.num_classes, self.num_features = num_classes, 64  # timm model attributes
        self.conv1 = nn.Conv2d(in_chans, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        stages, cin = [], 16
        for i, cout in enumerate((16, 32, 64)):
            blocks = []
            for j in range(n):
                blocks.append(_Block(cin, cout, 2 if (i > 0 and j == 0) else 1))
                cin = cout
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


for _depth in (20, 32, 44, 56, 110):
    register_timm_model(f"resnet{_depth}_cifar", functools.partial(CifarResNet, _depth),
                        input_size=(3, 32, 32), mean=CIFAR_MEAN, std=CIFAR_STD, classifier="fc",
                        first_conv="conv1")


# ----------------------------------------------------------------------------- TT-LSTM video classifier
class LSTMVideoClassifier(nn.Module):
    """``(B, T, D)`` frame features -> [Linear embed] -> nn.LSTM -> last hidden state -> Linear.

    Args:
        in_dim: features per frame (raw frames: pixels).
        hidden_size: LSTM hidden size.
        num_classes: classifier outputs.
        embed_dim: width of a Linear frame embedding before the LSTM (0: none).
    """

    def __init__(self, in_dim=784, hidden_size=64, num_classes=10, embed_dim=0, **_):
        super().__init__()
        self.embed = nn.Linear(in_dim, embed_dim) if embed_dim else nn.Identity()
        self.lstm = nn.LSTM(embed_dim or in_dim, hidden_size, batch_first=True)
        self.head = nn.Linear(hidden_size, num_classes)
        self.num_classes, self.num_features = num_classes, hidden_size  # timm model attributes

    def forward(self, x):
        out, _ = self.lstm(self.embed(x))
        return self.head(out[:, -1])


register_timm_model("lstm_video_classifier", LSTMVideoClassifier, input_size=(1, 8, 784), mean=(0.0,), std=(1.0,),
                    classifier="head")


# ----------------------------------------------------------------------------- VideoMAE
def videomae(hub_id: str | None, *, num_labels: int, frames: int, image_size: int, patch_size: int = 8,
             hidden_size: int = 64, layers: int = 2):
    """A VideoMAE video classifier: pretrained from ``hub_id`` (new head for ``num_labels``) or, with
    ``hub_id=None``, a small randomly initialised one (tubelet 2, ``hidden_size // 32`` heads)."""
    from transformers import AutoModelForVideoClassification, VideoMAEConfig, VideoMAEForVideoClassification
    labels = dict(id2label={i: str(i) for i in range(num_labels)}, label2id={str(i): i for i in range(num_labels)})
    if hub_id:
        return AutoModelForVideoClassification.from_pretrained(
            hub_id, num_labels=num_labels, ignore_mismatched_sizes=True, num_frames=frames,
            image_size=image_size, **labels)
    cfg = VideoMAEConfig(image_size=image_size, patch_size=patch_size, num_channels=3, num_frames=frames,
                         tubelet_size=2, hidden_size=hidden_size, num_hidden_layers=layers,
                         num_attention_heads=max(1, hidden_size // 32), intermediate_size=2 * hidden_size,
                         num_labels=num_labels, **labels)
    return VideoMAEForVideoClassification(cfg)
