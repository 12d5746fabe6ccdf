"""Masked-image-modelling objectives: name -> builder(vit, **options) -> nn.Module.

Each objective's forward(images [B, C, H, W]) returns {"loss", "pred", "mask"}.
"""
from pipeline.models.objectives.mae import MAE

OBJECTIVES = {"mae": MAE}
