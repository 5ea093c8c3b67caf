"""Retraining a student: KD maths, the recipe runtime (accelerator, checkpoints), the distill recipe, data, cache."""
