"""Shared test fixtures.

pytest-twisted runs one global reactor for the session; tests that need the network use
real loopback sockets on ports the kernel picks (port 0), never fixed ports.
"""
