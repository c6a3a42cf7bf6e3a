"""Federated training over personal clouds: models, datasets, local training, server optimizers."""
