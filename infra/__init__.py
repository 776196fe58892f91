"""Local infrastructure: Apache Kafka (KRaft, from Maven Central jars) and redis-server."""
