"""A recipient validator for relay: valid mailboxes are rows of an SQLite table."""
