"""The ground every other package stands on: settings, errors, metrics, logs, keys. Imports nothing above it
(no torch either, so the CLI can set OpenMP's wait policy before torch loads)."""
