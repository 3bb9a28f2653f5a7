"""Database tables, the engine/session factory, job state transitions and migrations."""
