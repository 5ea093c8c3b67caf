"""Proving the result: generation of a folder, prompt sets, metrics, the evaluate / report / profile jobs."""
