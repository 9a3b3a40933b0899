"""A delivery backend for relay: each message is POSTed to an HTTP endpoint."""
