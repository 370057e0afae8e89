"""Brokers: the protocol, the in-memory default, RabbitMQ and NATS JetStream, chosen by URL."""

from orchestrator.broker.base import (
    Broker,
    BrokerUnavailable,
    DeadLetter,
    DeadLetteredMessage,
    Delivery,
    MessageHandler,
    QueueFull,
    UnroutableError,
)
from orchestrator.broker.memory import InMemoryBroker
from orchestrator.config import BrokerSettings

__all__ = [
    "Broker",
    "BrokerUnavailable",
    "DeadLetter",
    "DeadLetteredMessage",
    "Delivery",
    "InMemoryBroker",
    "MessageHandler",
    "QueueFull",
    "UnroutableError",
    "broker_from_settings",
]


def broker_from_settings(settings: BrokerSettings) -> Broker:
    """The broker the settings' URL names: `memory://`, `amqp(s)://` or `nats://`."""
    if settings.scheme == "memory":
        return InMemoryBroker(settings)
    if settings.scheme == "nats":
        from orchestrator.broker.nats import NatsBroker

        return NatsBroker(settings)
    from orchestrator.broker.rabbitmq import RabbitMQBroker

    return RabbitMQBroker(settings)
