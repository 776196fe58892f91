"""``loyalty dashboard``: the live wall-screen page, its JSON API and ``/metrics`` (SPEC section 8).

- :mod:`.hub`: ONE Redis pub/sub subscription (``loyalty:updates``, ``loyalty:alerts``) fanned out
  in-process to every server-sent-events client; it reconnects with backoff when Redis goes away.
- :mod:`.data`: reading the Redis layout of SPEC sections 6 and 7 (snapshot hashes, history streams,
  the alerts stream, the store set).
- :mod:`.prometheus`: the ``/metrics`` collector, which reads Redis at scrape time.
- :mod:`.server`: the aiohttp application and :func:`~.server.run_dashboard`.
- ``static/``: the page (HTML, CSS, JS) and the vendored uPlot; nothing is loaded from another host.
"""
