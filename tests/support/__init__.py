"""Helpers the tests share: servers on free ports, a private RabbitMQ node."""
