"""Prompt tuning (Lester et al. 2021): learned input embeddings put in front of every input."""
