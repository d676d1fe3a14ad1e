"""Settings (read from the environment) and the Celery config module."""
