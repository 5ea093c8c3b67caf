"""The embedded toy world: tiny Stable-Diffusion-shaped models that stand in for real weights offline."""
