"""Adapter files: the format on disk (format.py), writing a model's adapters (save.py), one
adapter's tensors under PEFT's names (tensors.py), which base they belong to (fingerprint.py),
what `lorakit inspect` shows (inspect.py), pickle conversion (convert.py) and `lorakit merge`
(merge_to_dir.py). Methods are asked through their protocol, never named."""
