"""``omnitok serve``: the engine (continuous batching over one model) and, on it, the HTTP API and chat page."""
