"""onegpu under other libraries' training loops: ``onegpu.integrations.transformers`` (the Hugging Face Trainer).

Each module is imported by its path and imports its library only then: ``import onegpu`` never pulls them in."""
