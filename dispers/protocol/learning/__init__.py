"""Federated training as a query kind: the plaintexts of a round and each actor's training op."""
