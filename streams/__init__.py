"""Kafka/Faust side of the loyalty metrics stream: settings, app, pipeline, command line."""
