"""Agents: their registry (`registry`) and the meaning of their output (`parsers`)."""
