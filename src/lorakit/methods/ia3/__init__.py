"""(IA)³ (Liu et al. 2022): learned vectors that rescale activations — see layer.py."""
