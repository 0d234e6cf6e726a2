"""Backbones, the DINO head, the multi-crop network and the EMA teacher."""
