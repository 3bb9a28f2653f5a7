"""The FastAPI app: routes, schemas, auth. Never imports torch (the API image has none)."""
