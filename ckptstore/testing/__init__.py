"""Test support shipped with the package: a fault-injecting filesystem and the backend
conformance suite, so downstream backends can be checked the same way."""
