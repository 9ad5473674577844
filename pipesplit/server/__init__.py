"""The OpenAI-compatible HTTP server: `protocol` (wire format) and `app` (routes, process)."""
