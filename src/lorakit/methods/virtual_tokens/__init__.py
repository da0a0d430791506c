"""Methods that add learned *virtual tokens* instead of changing layers: prompt tuning and
P-tuning put them in front of the input embeddings, prefix tuning in front of every
layer's keys and values (transformers' `Cache`). What they share lives here: the config
fields (`config.py`), the per-adapter encoders of a model (`encoders.py`), the per-row hook
that extends one call — embeddings, attention mask, positions, labels, cache — for a batch
whose rows use different virtual-token adapters, or none (`inputs.py`), and the protocol
implementation (`method.py`)."""
