"""The consumer, on the worker's event loop: decode -> route -> batch -> hand off -> acknowledge."""
