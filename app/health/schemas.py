"""What the health endpoints answer: probes and typed clients read these bodies."""

from __future__ import annotations

import marshmallow as ma


class HealthSchema(ma.Schema):
    status = ma.fields.Str(required=True, metadata={"description": "`ok`"})


class WorkspaceCheckSchema(ma.Schema):
    status = ma.fields.Str(required=True, metadata={"description": "`ok` or `low`"})
    free_mb = ma.fields.Int(required=True, metadata={"description": "free space, in MB"})
    warning = ma.fields.Str(metadata={"description": "when the disk is almost full"})


class ReadyChecksSchema(ma.Schema):
    database = ma.fields.Str(required=True, metadata={"description": "`ok`"})
    redis = ma.fields.Str(required=True, metadata={"description": "`ok`"})
    workspace = ma.fields.Nested(WorkspaceCheckSchema, required=True)


class ReadySchema(ma.Schema):
    status = ma.fields.Str(required=True, metadata={"description": "`ready`"})
    checks = ma.fields.Nested(ReadyChecksSchema, required=True)


class VersionSchema(ma.Schema):
    version = ma.fields.Str(required=True, metadata={"description": "the server's version"})
    api = ma.fields.Str(required=True, metadata={"description": "the API version, `v1`"})
