"""Test support that plugin authors can import: contract suites for the plugin interfaces."""
