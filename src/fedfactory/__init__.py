"""FederatedFactory: one-shot generative federated learning on extremely non-IID data."""

__version__ = "0.1.0"
