"""``MethodUnavailable``: an evaluation method that cannot run in this environment."""

__all__ = ["MethodUnavailable"]


class MethodUnavailable(RuntimeError):
    """A method that cannot run in this environment (a missing or broken package); the message says why."""
