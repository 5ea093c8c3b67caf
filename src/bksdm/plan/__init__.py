"""Choosing what survives: plans, U-Net layouts, architectures, surgery, the prune job, plan renderings."""
