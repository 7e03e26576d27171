from flask.views import MethodView

from app.auth import service
from app.auth.guard import current_principal, public, requires
from app.auth.schemas import (
    LoginSchema,
    NewTokenSchema,
    RefreshSchema,
    StreamTokenRequestSchema,
    StreamTokenSchema,
    TokenCreateSchema,
    TokenPageSchema,
    TokenPairSchema,
    TokenSchema,
)
from app.extensions import Blueprint
from app.pagination import PageQuerySchema

blp = Blueprint("auth", __name__, url_prefix="/api/v1", description="Login, sessions and tokens")


@blp.route("/auth/login")
class Login(MethodView):
    @public
    @blp.arguments(LoginSchema)
    @blp.response(200, TokenPairSchema)
    def post(self, data):
        """Log in with a username or email and password (and a TOTP code when enabled)."""
        return service.login(
            data.get("username") or data["email"], data["password"], data.get("totp_code")
        )


@blp.route("/auth/refresh")
class Refresh(MethodView):
    @public
    @blp.arguments(RefreshSchema)
    @blp.response(200, TokenPairSchema)
    def post(self, data):
        """Exchange a refresh token for a new pair; a reused token revokes its whole login."""
        return service.refresh(data["refresh_token"])


@blp.route("/auth/logout")
class Logout(MethodView):
    @public
    @blp.arguments(RefreshSchema)
    @blp.response(204)
    def post(self, data):
        """End the login the refresh token belongs to."""
        service.logout(data["refresh_token"])


@blp.route("/auth/stream-token")
class StreamToken(MethodView):
    @requires()
    @blp.arguments(StreamTokenRequestSchema)
    @blp.response(201, StreamTokenSchema)
    @blp.doc(operationId="createStreamToken")
    def post(self, data):
        """A token for `?stream_token=` on streams under `path`, valid for 60 s (for
        EventSource, which cannot send headers)."""
        token, ttl = service.stream_token(current_principal(), data["path"])
        return {"token": token, "expires_in": ttl, "path": data["path"]}


@blp.route("/me/tokens")
class MyTokens(MethodView):
    @requires("account")
    @blp.arguments(PageQuerySchema, location="query")
    @blp.response(200, TokenPageSchema)
    def get(self, args):
        """List my personal access tokens (never the secrets)."""
        page = service.list_pats(
            current_principal().user.id, cursor=args.get("cursor"), limit=args["limit"]
        )
        return page.response()

    @requires("account")
    @blp.arguments(TokenCreateSchema)
    @blp.response(201, NewTokenSchema)
    def post(self, data):
        """Create a personal access token; its value is in this response only."""
        pat, raw = service.create_pat(
            current_principal(), data["label"], data["abilities"], data["expires_at"]
        )
        pat.token = raw  # shown in this response only; never stored
        return pat, 201, {"Location": f"/api/v1/me/tokens/{pat.id}"}


@blp.route("/me/tokens/<int:token_id>")
class MyToken(MethodView):
    @requires("account")
    @blp.response(200, TokenSchema)
    def get(self, token_id):
        """One of my tokens (never the secret)."""
        return service.get_pat(current_principal().user.id, token_id)

    @requires("account")
    @blp.response(204)
    def delete(self, token_id):
        """Revoke one of my tokens, at once."""
        service.revoke_pat(current_principal().user.id, token_id)
