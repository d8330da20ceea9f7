"""Preference and reinforcement learning (DESIGN.md §3.12): the DPO and GRPO losses, equal to TRL's."""

from train.rl.losses import DPO_LOSS_TYPES, GRPO_LOSS_TYPES, dpo_loss, grpo_loss

__all__ = ["DPO_LOSS_TYPES", "GRPO_LOSS_TYPES", "dpo_loss", "grpo_loss"]
