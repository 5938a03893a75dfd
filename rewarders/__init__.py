"""t2i-reward's reward experts and their mixture.

    from t2i_reward.rewarders import create_rewarder, list_experts, list_profiles
    rewarder = create_rewarder(profile="tiny")
    result = rewarder.score("a red apple on a table", ["apple.png"])
"""

from .config import RewardConfig, list_profiles, load_config
from .errors import (
    ImageTooLargeError,
    InvalidImageError,
    InvalidPromptError,
    InvalidRequestError,
    ModelLoadError,
    RewardError,
)
from .factory import create_rewarder
from .limits import Limits
from .mixture import ImageScore, Mixture, RewardResult, TensorScores
from .registry import Expert, ExpertConfig, get_expert_class, list_experts, register_expert

__all__ = [
    "Expert",
    "ExpertConfig",
    "ImageScore",
    "ImageTooLargeError",
    "InvalidImageError",
    "InvalidPromptError",
    "InvalidRequestError",
    "Limits",
    "Mixture",
    "ModelLoadError",
    "RewardConfig",
    "RewardError",
    "RewardResult",
    "TensorScores",
    "create_rewarder",
    "get_expert_class",
    "list_experts",
    "list_profiles",
    "load_config",
    "register_expert",
]
