"""The base of every error a user can fix from its message; the command line prints these as one line."""


class FedFactoryError(Exception):
    """A refused request or input (config, dataset, partition, run directory, ...); the message says the fix."""

    # Anything else that reaches the command line is a bug and keeps its traceback.
