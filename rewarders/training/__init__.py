"""Training and evaluating reward models on human preference data (ImageRewardDB format)."""

from .data import PreferenceRecord, load_preference_data, preference_pairs, split_by_prompt
from .evaluate import (
    evaluate_preferences,
    fit_weights,
    markdown_table,
    pair_differences,
    preference_accuracy,
    score_records,
)
from .fit import fit_mixture, write_fitted_config
from .train import TrainRewardConfig, train_reward

__all__ = [
    "PreferenceRecord",
    "TrainRewardConfig",
    "evaluate_preferences",
    "fit_mixture",
    "fit_weights",
    "load_preference_data",
    "markdown_table",
    "pair_differences",
    "preference_accuracy",
    "preference_pairs",
    "score_records",
    "split_by_prompt",
    "train_reward",
    "write_fitted_config",
]
