from flask import Blueprint as FlaskBlueprint
from flask import current_app, g, request
from flask.views import MethodView

from app.auth.guard import current_principal, public, requires
from app.extensions import Blueprint, sock
from app.live.sse import process_streams
from app.machines import protocol, service
from app.machines.connection import Connection
from app.machines.models import executor_name
from app.machines.schemas import (
    MachineCountsSchema,
    MachineListSchema,
    MachineQuerySchema,
    MachineSchema,
    MachineTokenCreateSchema,
    MachineTokenListSchema,
    MachineUpdateSchema,
    NewCredentialSchema,
    NewMachineTokenSchema,
    RegisteredSchema,
    RegisterSchema,
    RotateSchema,
)
from app.pagination import PageQuerySchema
from app.projects import service as projects
from app.runs import service as runs
from app.runs.schemas import RunPageSchema

blp = Blueprint(
    "machines",
    __name__,
    url_prefix="/api/v1",
    description="Machines: hosts of your own that connect out to Switchboard and run agents",
)


def _attributes(row, schema, **extra):  # type: ignore[no-untyped-def]
    """The row's values for the response schema's fields, and what it does not hold."""
    return {**{f: getattr(row, f) for f in schema._declared_fields if hasattr(row, f)}, **extra}


def _machine(machine):  # type: ignore[no-untyped-def]
    return _attributes(machine, MachineSchema, state=service.state(machine))


def _ws_url() -> str:
    """The control channel, as the machine reached us (behind a proxy: its scheme and host)."""
    root = request.url_root.rstrip("/")
    scheme = "wss" if root.startswith("https://") else "ws"
    return f"{scheme}://{root.split('://', 1)[1]}/api/v1/machines/connect"


@blp.route("/machine-tokens")
class MachineTokens(MethodView):
    @requires("admin")
    @blp.response(200, MachineTokenListSchema)
    def get(self):
        """Enrollment tokens (admin), newest first; a token is never shown again."""
        return {"data": service.list_tokens()}

    @requires("admin")
    @blp.arguments(MachineTokenCreateSchema)
    @blp.response(201, NewMachineTokenSchema)
    def post(self, data):
        """Make an enrollment token (admin): `uses` machines may register with it, until it
        expires or is revoked. The token is shown this once."""
        row, token = service.create_token(current_principal(), data)
        body = _attributes(row, NewMachineTokenSchema, token=token)
        return body, 201, {"Location": f"/api/v1/machine-tokens/{row.id}"}


@blp.route("/machine-tokens/<int:token_id>")
class MachineTokenById(MethodView):
    @requires("admin")
    @blp.response(204)
    @blp.doc(operationId="revokeMachineToken")
    def delete(self, token_id):
        """Revoke an enrollment token (admin): machines it registered keep working."""
        service.revoke_token(token_id)


@blp.route("/machines/register")
class MachineRegister(MethodView):
    @public
    @blp.arguments(RegisterSchema)
    @blp.response(201, RegisteredSchema)
    @blp.alt_response(409, response="CONFLICT")
    @blp.doc(operationId="registerMachine")
    def post(self, data):
        """Register a machine with an enrollment token (no other credential): its credential
        (`sbk_…`) is shown this once. 401 for a token used up, expired or revoked; 409 for a
        name taken, unless the token says `replace`."""
        machine, credential = service.register(data)
        body = {
            "machine_id": machine.id,
            "name": machine.name,
            "credential": credential,
            "ws_url": _ws_url(),
        }
        return body, 201, {"Location": f"/api/v1/machines/{machine.id}"}


@blp.route("/machines/<int:machine_id>/rotate-credential")
class MachineRotateCredential(MethodView):
    @public
    @blp.arguments(RotateSchema)
    @blp.response(200, NewCredentialSchema)
    @blp.doc(operationId="rotateMachineCredential")
    def post(self, data, machine_id):
        """A new credential for the machine, given its current one (which stops working)."""
        machine, fresh = service.rotate_credential(machine_id, data["credential"])
        return {"machine_id": machine.id, "credential": fresh}


@blp.route("/machines/healthz")
class MachinesHealth(MethodView):
    @public
    @blp.response(200, MachineCountsSchema)
    @blp.doc(operationId="getMachineCounts")
    def get(self):
        """Machines by state, counts only (no credential needed: for monitoring)."""
        return service.counts()


@blp.route("/machines")
class Machines(MethodView):
    @requires("projects:read")
    @blp.arguments(MachineQuerySchema, location="query")
    @blp.response(200, MachineListSchema)
    def get(self, args):
        """Machines, by name (any user: to know where tasks can run)."""
        found = service.list_machines(args.get("state"), args.get("label"))
        return {"data": [_machine(m) for m in found]}


@blp.route("/machines/<int:machine_id>")
class MachineById(MethodView):
    @requires("projects:read")
    @blp.response(200, MachineSchema)
    def get(self, machine_id):
        """A machine: hardware, agents, labels, slots, its last heartbeat and figures."""
        return _machine(service.get_machine(machine_id))

    @requires("admin")
    @blp.arguments(MachineUpdateSchema)
    @blp.response(200, MachineSchema)
    def patch(self, data, machine_id):
        """Change a machine's labels or slots (admin)."""
        return _machine(service.update(service.get_machine(machine_id), data))

    @requires("admin")
    @blp.response(200, MachineSchema)
    @blp.doc(operationId="decommissionMachine")
    def delete(self, machine_id):
        """Decommission a machine (admin): its credential stops working and its active runs
        are queued again."""
        return _machine(service.decommission(service.get_machine(machine_id)))


@blp.route("/machines/<int:machine_id>/drain")
class MachineDrain(MethodView):
    @requires("admin")
    @blp.response(200, MachineSchema)
    @blp.doc(operationId="drainMachine")
    def post(self, machine_id):
        """Drain a machine (admin): it finishes the runs it has and takes no new ones."""
        return _machine(service.set_draining(service.get_machine(machine_id), True))


@blp.route("/machines/<int:machine_id>/undrain")
class MachineUndrain(MethodView):
    @requires("admin")
    @blp.response(200, MachineSchema)
    @blp.doc(operationId="undrainMachine")
    def post(self, machine_id):
        """Take a machine out of draining (admin)."""
        return _machine(service.set_draining(service.get_machine(machine_id), False))


@blp.route("/machines/<int:machine_id>/runs")
class MachineRuns(MethodView):
    @requires("projects:read")
    @blp.arguments(PageQuerySchema, location="query")
    @blp.response(200, RunPageSchema)
    @blp.doc(operationId="listMachineRuns")
    def get(self, args, machine_id):
        """Runs on the machine, newest first (of the projects I can see)."""
        machine = service.get_machine(machine_id)
        return runs.list_runs(
            projects.visible_project_ids(current_principal()),
            executor_is=executor_name(machine),
            cursor=args.get("cursor"),
            limit=args["limit"],
        ).response()


# -- the control channel (a WebSocket: outside the OpenAPI document, see docs/machines.md) -------

ws_blp = FlaskBlueprint("machines_ws", __name__)


@ws_blp.record_once
def _limit_frames(state) -> None:  # type: ignore[no-untyped-def]
    state.app.config.setdefault(
        "SOCK_SERVER_OPTIONS", {"max_message_size": protocol.MAX_FRAME_BYTES}
    )


@ws_blp.before_request
def _before_the_handshake() -> None:
    """A channel holds a web thread: it counts as a stream against the process's cap (503
    before the handshake). No permessage-deflate: a frame inflates before its size is
    checked, so a small compressed frame could fill the memory."""
    g.channel_slot = process_streams.take(current_app.config["SWITCHBOARD_STREAMS_PER_PROCESS"])
    request.environ.pop("HTTP_SEC_WEBSOCKET_EXTENSIONS", None)


@ws_blp.teardown_request
def _give_the_slot_back(_exc: BaseException | None) -> None:
    give_back = g.pop("channel_slot", None)
    if give_back is not None:
        give_back()


def _channel(ws) -> None:  # type: ignore[no-untyped-def]
    """`WS /api/v1/machines/connect`: a machine's control channel (credential in the first
    frame; docs/machines.md)."""
    Connection(ws, current_app._get_current_object()).serve()  # type: ignore[attr-defined]


_channel._public = True  # type: ignore[attr-defined]
sock.route("/api/v1/machines/connect", bp=ws_blp)(_channel)
