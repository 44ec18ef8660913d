"""SMS: the durable outbox and the delivery backends."""
