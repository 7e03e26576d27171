"""Terminals: agents in a pseudo-terminal, and people attached to it over WebSockets.

The run's executor (a pool worker, or a machine through its control channel) holds the terminal;
a person's socket is held by whichever web process took it. Output reaches sockets the way it
reaches streams (the run's Redis channel, `runs.stream`); what people type and resize goes the
other way through the run's terminal inbox (`relay`), read in order by the executor.
"""
