"""The built-in recipient validators (registered in relay/plugins/validators.py)."""
