"""bksdm: block removal and knowledge distillation for Stable Diffusion (BK-SDM)."""

__version__ = "0.1.0"
