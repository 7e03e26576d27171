"""Inbound webhooks: sources that verify signatures, stored deliveries (events), and per-project
rules that turn an event into tasks."""
