"""The worker: the Faust app and everything it runs.

- :mod:`.app`: ``create_app(settings)``, the Faust app factory; :mod:`.run`: one worker process;
- :mod:`.pipeline`: ``register_pipeline``, which puts the parts of :mod:`.agents` on the app;
- :mod:`.topology`: what those parts share (topics, tables, clock, sinks);
- :mod:`.input_reader`: the input topics' aiokafka reader;
- :mod:`.topics`: topic names and creation; :mod:`.tables`: the routed tables and their store;
- :mod:`.wire`: packed internal messages and the routing of keys to partitions.
"""
