"""GRPO for GETok grounding: rewards (pure, numpy) and trl GRPOTrainers for LLaVA and for the transformers-native
backend (Qwen2.5-VL, llava-hf), imported lazily; the starting checkpoint's sidecar picks one.

Run ``python -m llava_getok.rl --help``; rewards: :mod:`llava_getok.rl.rewards`.
"""
from .rewards import REWARDS, STAGE_REWARDS, RewardConfig, get_reward

__all__ = ["REWARDS", "STAGE_REWARDS", "RewardConfig", "get_reward"]
