"""AdaLoRA (Zhang et al. 2023): LoRA in SVD form, P Λ Q, whose ranks a budget schedule prunes while training."""
