"""Examples of extending the framework from outside it (a user's own environment)."""
