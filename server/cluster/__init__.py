"""`rankserve cluster`: the same HTTP API on Ray Serve, N engine replicas routed by adapter id (model
multiplexing). Nothing below this package imports it; Ray is imported only here (the `cluster` extra)."""
