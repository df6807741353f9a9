"""Flower entry points: `client_app.app` and `server_app.app`, declared in pyproject.toml for `flwr run .`.

They only move bytes: the client and factory functions are the ones `fedfactory run` calls. Needs the optional
extra: `pip install "fedfactory[flower]"`.
"""
