"""Training and evaluating reward models on human preference data (ImageRewardDB format)."""

from .data import PreferenceRecord, load_preference_data, preference_pairs, split_by_prompt
from .evaluate import fit_weights, pair_differences, preference_accuracy, score_records
from .train import TrainRewardConfig, train_reward

__all__ = [
    "PreferenceRecord",
    "TrainRewardConfig",
    "fit_weights",
    "load_preference_data",
    "pair_differences",
    "preference_accuracy",
    "preference_pairs",
    "score_records",
    "split_by_prompt",
    "train_reward",
]
