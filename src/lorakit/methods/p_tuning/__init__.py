"""P-tuning (Liu et al. 2021): virtual input tokens produced by a small MLP or LSTM encoder while training."""
