"""Reading checkpoints: Hugging Face / PyTorch folders of every family (safetensors or .bin, single or sharded,
Megatron mp_rank files), glm-convert's to-jax folders and glm-train run directories.

    files.py     safetensors and torch files, validated; which files a folder holds
    megatron.py  THUDM/GLM Megatron checkpoints, merged across model-parallel ranks
    hf.py        an HF folder's tensors -> params through the family's key map
    orbax.py     to-jax folders and glm-train runs (Orbax), one tensor at a time
"""

from glm_jax.checkpoint.files import SafetensorsFile, TorchFile, find_weight_files, read_config
from glm_jax.checkpoint.hf import config_from_folder, iter_params, load_params, open_weights
from glm_jax.checkpoint.orbax import load_jax, open_jax
from glm_jax.errors import CheckpointFormatError

__all__ = [
    "CheckpointFormatError",
    "SafetensorsFile",
    "TorchFile",
    "config_from_folder",
    "find_weight_files",
    "iter_params",
    "load_jax",
    "load_params",
    "open_jax",
    "open_weights",
    "read_config",
]
