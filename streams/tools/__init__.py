"""The operator tools: what people run beside the worker.

- :mod:`.storefront`: the storefront traffic model (one model for every tool and test);
- :mod:`.simulate`: ``loyalty simulate``, the model sent to Kafka live or as a backfill;
- :mod:`.history`: the model as a history in arrival order (late events, duplicates), for tests;
- :mod:`.replay`: ``loyalty replay``, a JSON-lines file sent in batches;
- :mod:`.snapshot`: ``loyalty snapshot``, the metrics in Redis as a table or JSON;
- :mod:`.demo`: ``loyalty demo``, a worker and live traffic with a live table.
"""
