"""The ringtail Trio daemon: protocol codec, listeners, tenants, batching, subscribers, CLI."""
