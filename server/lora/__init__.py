"""The adapter machinery: device slots (``pool``), their buffers, residency tiers and loader threads
(``residency``), the per-step batch plan (``plan``), the wrapped linear (``layer``), merge mode (``merge``,
``merge_policy``), and the batched low-rank op with its backends (``ops``, chosen once at start-up)."""
