import contextlib

from flask import Blueprint as FlaskBlueprint
from flask import current_app, g, request
from flask.views import MethodView

from app.auth import service as auth_service
from app.auth.abilities import abilities_for_role
from app.auth.guard import current_principal, requires
from app.auth.service import Principal
from app.database import db
from app.errors import Conflict, Forbidden, Unauthorized
from app.extensions import Blueprint, sock
from app.live.sse import StreamSlot, process_streams
from app.terminals import service, tokens
from app.terminals.schemas import TerminalTokenRequestSchema, TerminalTokenSchema
from app.terminals.session import SCROLLBACK, Session
from app.users.models import User

blp = Blueprint(
    "terminals",
    __name__,
    url_prefix="/api/v1/runs",
    description="Terminals: watch an agent's pseudo-terminal, or take its keyboard",
)


def _socket_url(run_id: int, token: str) -> str:
    root = request.url_root.rstrip("/")
    scheme = "wss" if root.startswith("https://") else "ws"
    return f"{scheme}://{root.split('://', 1)[1]}/api/v1/runs/{run_id}/terminal?token={token}"


@blp.route("/<int:run_id>/terminal-token")
class TerminalToken(MethodView):
    @requires("projects:read")
    @blp.arguments(TerminalTokenRequestSchema)
    @blp.response(201, TerminalTokenSchema)
    @blp.doc(operationId="createTerminalToken")
    def post(self, data, run_id):
        """A single-use token (60 s) to attach to the run's terminal: `view` to watch, `control`
        to type (developer and `runs:control`). Browsers cannot send headers on a WebSocket:
        the token goes in the socket's URL (docs/usage.md, Terminals)."""
        principal = current_principal()
        service.attachable(principal, run_id, data["mode"])
        token, expires_at = tokens.issue(principal, run_id, data["mode"])
        return {
            "token": token,
            "mode": data["mode"],
            "expires_at": expires_at,
            "url": _socket_url(run_id, token),
        }, 201


# -- the socket (outside the OpenAPI document, see docs/usage.md) ---------------------------------

ws_blp = FlaskBlueprint("terminals_ws", __name__)


def _principal(grant: tokens.Grant) -> Principal:
    """The token's user as they are now (active, their login or token still live, the
    abilities their role gives now and the token held)."""
    user = db.session.get(User, grant.user_id)
    if user is None or not user.is_active:
        raise Unauthorized("The terminal token is not valid.", code="invalid_token")
    asked = Principal(
        user=user,
        abilities=frozenset(grant.abilities) & abilities_for_role(user.role),
        kind="pat" if grant.token_id is not None else "session",
        token_id=grant.token_id,
        family_id=grant.family_id,
    )
    return auth_service.reconfirm(asked)


@ws_blp.before_request
def _before_the_handshake() -> None:
    """Everything that can refuse an attach does so here, as a problem+json answer, before
    the socket opens: the token (once), the user's access now, the keyboard (409)."""
    view_args = request.view_args or {}
    run_id = int(view_args.get("run_id", 0))
    grant = tokens.redeem(request.args.get("token", ""))
    if grant is None:
        raise Unauthorized(
            "The terminal token is not valid: unknown, expired or used already "
            "(POST /api/v1/runs/{id}/terminal-token gives one).",
            code="invalid_token",
        )
    if grant.run_id != run_id:
        raise Forbidden("This terminal token is for another run.")
    principal = _principal(grant)
    g.principal = principal
    run = service.attachable(principal, run_id, grant.mode)
    cfg = current_app.config
    g.terminal_slot = process_streams.take(cfg["SWITCHBOARD_STREAMS_PER_PROCESS"])
    g.terminal_user_slot = StreamSlot(
        principal.user.id,
        cfg["SWITCHBOARD_STREAM_CAP"],
        ttl=max(30, cfg["SWITCHBOARD_STREAM_PING_SECONDS"] * 3),
    )
    holder = Session.new_holder(principal.user.id, principal.user.username)
    if grant.mode == "control":
        service.take_control(run_id, holder, takeover=request.args.get("takeover") in ("1", "true"))
    g.terminal = (grant.mode, holder, max(0, run.log_size - SCROLLBACK))
    request.environ.pop("HTTP_SEC_WEBSOCKET_EXTENSIONS", None)  # see machines' channel


@ws_blp.teardown_request
def _give_the_slots_back(_exc: BaseException | None) -> None:
    give_back = g.pop("terminal_slot", None)
    if give_back is not None:
        give_back()
    slot = g.pop("terminal_user_slot", None)
    if slot is not None:
        slot.release()


def _terminal(ws, run_id: int) -> None:  # type: ignore[no-untyped-def]
    """`WS /api/v1/runs/{id}/terminal?token=…`: attach to a run's terminal (docs/usage.md)."""
    mode, holder, start = g.terminal
    principal = g.principal

    def check(now_mode: str) -> None:
        """Raises when the user may no longer attach as they are (a run that ended meanwhile
        is not a loss of access: the socket ends with `exit`)."""
        fresh = auth_service.reconfirm(principal)
        with contextlib.suppress(Conflict):
            service.attachable(fresh, run_id, now_mode)

    app = current_app._get_current_object()  # type: ignore[attr-defined]
    Session(ws, app, run_id, mode, holder, start, check).serve()


_terminal._public = True  # type: ignore[attr-defined]
sock.route("/api/v1/runs/<int:run_id>/terminal", bp=ws_blp)(_terminal)
