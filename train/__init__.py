"""glm-train: sharded blank-infilling pretraining and finetuning of GLM models (see train/main.py)."""
