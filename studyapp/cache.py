"""Django's RedisCache with one Redis client per connection pool, not one per call.

Django's ``RedisCacheClient.get_client`` builds a new ``redis.Redis`` object for every cache
call; the rate-limit check makes two calls per participant write (DRF's throttle reads and
writes its history). Building the client was most of their cost: measured in-process against
a local redis-server, a get + set took 0.87 ms with Django's client and 0.3 ms with this
one (``/tmp`` micro-benchmark recorded in BENCHMARKS.md's server section). A ``redis.Redis``
object is thread-safe (each command takes a connection from the pool), and Django's cache
handler already gives every thread its own cache object.
"""

from __future__ import annotations

from django.core.cache.backends.redis import RedisCache as DjangoRedisCache
from django.core.cache.backends.redis import RedisCacheClient


class PooledRedisCacheClient(RedisCacheClient):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._clients: dict[int, object] = {}

    def get_client(self, key=None, *, write=False):
        pool = self._get_connection_pool(write)
        client = self._clients.get(id(pool))
        if client is None:
            client = self._clients[id(pool)] = self._client(connection_pool=pool)
        return client


class RedisCache(DjangoRedisCache):
    """``PERCEPTLAB_CACHE=redis://...``: Django's RedisCache, its clients reused."""

    def __init__(self, server, params) -> None:
        super().__init__(server, params)
        self._class = PooledRedisCacheClient
