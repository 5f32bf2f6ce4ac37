"""rankserve trainer: adapter methods, the training loop, export to the compiled form, and the CLI."""
