"""Durable intake: the Dramatiq broker, its queues, middleware and consumers."""
