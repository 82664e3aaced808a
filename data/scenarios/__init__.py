"""Generative models of `mbrec synth` (one file each): known truth per row, fixed parameters."""
