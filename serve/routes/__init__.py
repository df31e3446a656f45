"""HTTP routers, one per resource: v1 (classification), v2 (Open Inference Protocol), ops (metrics)."""
