"""Reliability, fault, hostile-input, access-control and load tests of the server."""
