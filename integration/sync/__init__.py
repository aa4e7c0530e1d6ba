"""Sync with ERP and finance after go-live: spec, change capture, outbox, inbound with ownership."""
