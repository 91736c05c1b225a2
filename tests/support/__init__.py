"""Test and benchmark support, importable as ``tests.support`` from the repository root.

- :mod:`tests.support.pgserver`: a throwaway PostgreSQL cluster (and where its binaries are);
- :mod:`tests.support.redisserver`: a throwaway redis-server;
- :mod:`tests.support.http`: a small cookie- and CSRF-aware HTTP client for live servers.
"""
