"""Helpers shared by the test suites: real data paths, a real MONAI Label server, small models."""
