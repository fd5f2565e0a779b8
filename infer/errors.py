"""The inference module's one error type: bad user input, named where it came from."""

from __future__ import annotations


class InferError(ValueError):
    """A user input the inference module cannot run (image, trajectory, settings); the message says which and why."""
