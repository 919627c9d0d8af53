"""One small module per loss term (RepDistiller's distiller_zoo style)."""

from igkd.distill.losses.attention import FeatureTap, attention_map, attention_layers, attention_transfer_loss, default_attention_layer
from igkd.distill.losses.kd import kd_loss

__all__ = ["FeatureTap", "attention_layers", "attention_map", "attention_transfer_loss", "default_attention_layer", "kd_loss"]
