"""Command line (`mbrec`), run configs and the torchx component."""
