"""The service's Python clients, kept here for existing imports: `RewardClient` lives in
`t2i_reward.rewarders.client` (httpx only) and `Validator` in `t2i_reward.prompter.validator`."""

from t2i_reward.prompter.validator import Validator
from t2i_reward.rewarders.client import RewardClient, RewardServiceError, image_bytes

__all__ = ["RewardClient", "RewardServiceError", "Validator", "image_bytes"]
