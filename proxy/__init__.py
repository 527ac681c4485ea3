"""authproxy: an authenticating egress proxy."""
