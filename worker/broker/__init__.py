"""Everything about RabbitMQ the worker's two sides share: the queues and how messages are published."""
