"""Bottleneck adapter layers (Houlsby et al. 2019; Pfeiffer et al. 2020): a small down-up MLP on a sublayer's output."""
