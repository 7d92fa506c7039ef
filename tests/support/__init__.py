"""Helpers shared by the tests: servers, clients, real data, tiny training data."""
