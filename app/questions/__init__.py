"""Questions: an agent asks (with its run's token), a person answers; the run waits meanwhile."""
