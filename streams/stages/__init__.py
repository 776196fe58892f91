"""The four processing stages as plain classes, without Faust: decoded input and state in, messages and state out.

1. :mod:`streams.stages.ingest` (input topics, any key): validation, dead letters,
   events routed by store.
2. :mod:`streams.stages.gate` (by store): the store's currency gate and, with the wall
   clock, events from the near future held until "now" reaches them.
3. :mod:`streams.stages.facts` (by store and customer): deduplication, customer
   facts, and the difference of the customer's contributions as deltas routed
   by store, also to ``*``.
4. :mod:`streams.stages.aggregate` (by store): folds the deltas, each message part at
   most once, and reads the metrics.

What a stage sends on is a :class:`streams.stages.routed.Routed`. Keeping the stages free
of Faust keeps the worker's wiring (:mod:`streams.worker`) thin and lets the tests and
``bench/stages_speed.py`` drive every stage directly.
"""
