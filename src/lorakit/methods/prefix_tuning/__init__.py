"""Prefix tuning (Li & Liang 2021): learned keys and values in front of every attention layer's own."""
