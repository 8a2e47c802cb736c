"""HTTP serving of 1 + N: one base in memory, every task's adapters, mixed-task continuous batching.

    python -m cgc_lora_jax.serve --workdir runs/demo [--host 127.0.0.1] [--port 8000]

Modules, from the device up: slots.py (decode slots over one KV cache, prefill and the vmapped
decode step), generation.py (one request's tokens, text deltas, stop rules), prompts.py (request
text -> prompt ids), engine.py (slot groups per cluster, queues, the loop thread), protocol.py
(OpenAI request parsing and response shapes), app.py (the FastAPI routes), __main__.py (the CLI).
"""
