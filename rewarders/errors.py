"""Errors the library raises for bad input or missing models, and `public_message`, what of an error a
client (or a job's record) may be shown.

Every one is a `ValueError` subclass, so callers (the CLI, the HTTP service) can turn them into a
clear message or a 4xx answer without catching unrelated bugs.
"""

import re

# a URL (its credentials, host and path) and an absolute path of two parts or more
_URL = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>]+")
_PATH = re.compile(r"(?<![\w.~:/-])(?:/[\w.@+-]+){2,}/?")


def public_message(text: str) -> str:
    """`text` with every URL and absolute server path replaced: errors sent to clients and written to job
    records name no credentials, internal hosts or paths (the logs keep the full message)."""
    return _PATH.sub("<path>", _URL.sub("<url>", text))


class RewardError(ValueError):
    """Base class of every error caused by the caller's input or configuration."""


class InvalidImageError(RewardError):
    """The bytes or file given as an image cannot be decoded (not an image, truncated, corrupt)."""


class ImageTooLargeError(RewardError):
    """The image has more pixels than the configured limit (checked before decoding)."""


class InvalidPromptError(RewardError):
    """The prompt is missing, of the wrong type or longer than the configured limit."""


class InvalidRequestError(RewardError):
    """Anything else wrong with a scoring call: no images, unknown expert names, bad weights."""


class ModelLoadError(RewardError):
    """A configured checkpoint, tokenizer or CLIP model could not be found or loaded."""


class MalformedBodyError(InvalidRequestError):
    """A request body that cannot be parsed at all (not safetensors, a broken multipart body): the service's 400."""


class UnsupportedMediaTypeError(InvalidRequestError):
    """A request body of a content type the endpoint does not take: the service's 415."""


class InvalidBodyError(InvalidRequestError):
    """A JSON body that parses but does not match its schema; `errors` lists each problem (pydantic's
    `type`, `loc`, `msg`, `ctx`, never the input), which the service answers as its 422 detail."""

    def __init__(self, errors: list):
        super().__init__("; ".join(f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg')}" for e in errors))
        self.errors = errors


class UnsafePickleError(MalformedBodyError):
    """A pickle body that names a global, a call or a type the safe unpickler does not allow, or is
    malformed (`safe_pickle.safe_loads`): the service's 400."""
