"""Outbound webhooks: subscriptions that receive signed JSON events, with retries, backoff and
dead letters that can be redelivered."""
