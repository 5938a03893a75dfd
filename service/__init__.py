"""The reward service: a thin FastAPI shell over `rewarders`, `prompter` and `finetune` (see app.create_app).

Importing the package imports nothing else: `t2i_reward.service.app` (FastAPI) loads only when asked for.
"""

__all__ = ["Settings", "create_app"]


def __getattr__(name: str):
    if name == "create_app":
        from .app import create_app

        return create_app
    if name == "Settings":
        from .settings import Settings

        return Settings
    raise AttributeError(name)
