"""GRPO for GETok grounding: rewards (pure, numpy) and a LLaVA-aware trl GRPOTrainer (imported lazily).

Run ``python -m llava_getok.rl --help``; rewards: :mod:`llava_getok.rl.rewards`.
"""
from .rewards import REWARDS, STAGE_REWARDS, RewardConfig, get_reward

__all__ = ["REWARDS", "STAGE_REWARDS", "RewardConfig", "get_reward"]
