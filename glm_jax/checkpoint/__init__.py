"""Reading checkpoints: Hugging Face / PyTorch folders of every family (safetensors or .bin, single or sharded,
Megatron mp_rank files), glm-convert's to-jax folders and glm-train run directories.

    files.py     safetensors and torch files, validated; which files a folder holds
    megatron.py  THUDM/GLM Megatron checkpoints, merged across model-parallel ranks
    hf.py        an HF folder's tensors -> params through the family's key map
    orbax.py     to-jax folders and glm-train runs (Orbax), one tensor at a time
    store.py     the ParamStore protocol: params read one tensor at a time
    layout.py    the stacked-layer layout: which scan stacks exist, where layer i lives

Import from the modules (the package itself imports nothing, so that the model can ask layout.py without
loading the readers)."""
