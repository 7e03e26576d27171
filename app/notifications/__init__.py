"""Notifications: people are told when they are needed (a question, a review), when their task
failed, and (admins) when a machine went offline: in the app, by email, in a chat channel."""
