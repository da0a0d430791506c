"""Training: data encoding now; the config-driven job (trainer, report) builds on it."""
