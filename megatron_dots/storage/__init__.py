"""Files on disk that conversion, training and `verify` share: atomic writes, errors that name
the file, integrity manifests and structural checks of safetensors and torch_dist checkpoints.
"""
