"""The base model's forward for generation: the runner (one flat token batch mixing prefill chunks and
decodes), attention over the paged KV cache, the cache itself, and the device and dtype it runs in. Knows nothing of adapters: the wrapped
linears (``server.lora``) read the step's plan on their own."""
