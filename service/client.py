"""The service's Python clients, kept here for existing imports: `RewardClient` lives in
`rewarders.client` (httpx only) and `Validator` in `prompter.validator`."""

from prompter.validator import Validator
from rewarders.client import RewardClient, RewardServiceError, image_bytes

__all__ = ["RewardClient", "RewardServiceError", "Validator", "image_bytes"]
