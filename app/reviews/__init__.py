"""Reviews: an agent's change waits for a person's approval before it is pushed."""
