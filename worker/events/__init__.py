"""Events: reading message bodies and checking events against the API's rules. Both sides use it."""
