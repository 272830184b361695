"""Plain service functions (no FastAPI): keyword-only, take a session, raise app.errors."""
