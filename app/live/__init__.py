"""Everything live: Redis pub/sub for notifications, run output and stop requests (`pubsub`),
and the Server-Sent Events machinery every stream is served with (`sse`)."""
