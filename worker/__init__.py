"""The Netcore activity worker: events from RabbitMQ to the Netcore CE Activity API, in batches.

``__version__`` is the one place the version is written: the package's metadata
(``pyproject.toml``) and ``netcore-activity --version`` read it from here.
"""

#: The release, as in CHANGELOG.md (semantic versioning: the public contract is the API).
__version__ = "1.0.0"
