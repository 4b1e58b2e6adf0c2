"""The HTTP API: FastAPI app, envelope, auth, one router module per resource."""
