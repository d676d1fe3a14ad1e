"""Operating the worker: metrics, Sentry, logs, health, Flower, start-up, the process supervisor."""
