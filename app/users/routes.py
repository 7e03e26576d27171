from flask.views import MethodView

from app.auth.guard import current_principal, requires
from app.extensions import Blueprint
from app.users import service
from app.users.schemas import (
    MeSchema,
    PasswordChangeSchema,
    ProfileUpdateSchema,
    TotpCodeSchema,
    TotpSetupSchema,
    UserCreateSchema,
    UserPageSchema,
    UserQuerySchema,
    UserSchema,
    UserUpdateSchema,
)

blp = Blueprint("users", __name__, url_prefix="/api/v1", description="Accounts")


def _me(principal, user=None):  # type: ignore[no-untyped-def]
    user = user or principal.user
    user.abilities = sorted(principal.abilities)  # per-request view of the credential
    return user


@blp.route("/me")
class Me(MethodView):
    @requires()
    @blp.response(200, MeSchema)
    def get(self):
        """Who I am, and what this credential may do."""
        return _me(current_principal())

    @requires("account")
    @blp.arguments(ProfileUpdateSchema)
    @blp.response(200, MeSchema)
    def patch(self, data):
        """Change my email or git identity."""
        principal = current_principal()
        user = service.update_profile(service.current_user(principal.user.id), data)
        return _me(principal, user)


@blp.route("/me/password")
class MyPassword(MethodView):
    @requires("account")
    @blp.arguments(PasswordChangeSchema)
    @blp.response(204)
    def put(self, data):
        """Change my password; my other logins end."""
        principal = current_principal()
        service.change_password(
            service.current_user(principal.user.id),
            data["current_password"],
            data["new_password"],
            principal.family_id,
        )


@blp.route("/me/totp/setup")
class MyTotpSetup(MethodView):
    @requires("account")
    @blp.response(200, TotpSetupSchema)
    def post(self):
        """Start TOTP enrolment: a secret and an otpauth:// URI (not active until verified)."""
        secret, uri = service.totp_setup(service.current_user(current_principal().user.id))
        return {"secret": secret, "otpauth_uri": uri}


@blp.route("/me/totp/verify")
class MyTotpVerify(MethodView):
    @requires("account")
    @blp.arguments(TotpCodeSchema)
    @blp.response(204)
    def post(self, data):
        """Turn TOTP on with a code from the authenticator."""
        service.totp_verify(service.current_user(current_principal().user.id), data["code"])


@blp.route("/me/totp")
class MyTotp(MethodView):
    @requires("account")
    @blp.arguments(TotpCodeSchema)
    @blp.response(204)
    def delete(self, data):
        """Turn TOTP off (needs a current code)."""
        service.totp_disable(service.current_user(current_principal().user.id), data["code"])


@blp.route("/users")
class Users(MethodView):
    @requires("admin")
    @blp.arguments(UserQuerySchema, location="query")
    @blp.response(200, UserPageSchema)
    def get(self, args):
        """List users (admin)."""
        return service.list_users(
            role=args.get("role"),
            active=args.get("active"),
            q=args.get("q"),
            cursor=args.get("cursor"),
            limit=args["limit"],
        ).response()

    @requires("admin")
    @blp.arguments(UserCreateSchema)
    @blp.response(201, UserSchema)
    def post(self, data):
        """Create a user (admin)."""
        user = service.create_user(data.pop("username"), data.pop("password"), **data)
        return user, 201, {"Location": f"/api/v1/users/{user.id}"}


@blp.route("/users/<int:user_id>")
class UserById(MethodView):
    @requires("admin")
    @blp.response(200, UserSchema)
    def get(self, user_id):
        """One user (admin)."""
        return service.get_user(user_id)

    @requires("admin")
    @blp.arguments(UserUpdateSchema)
    @blp.response(200, UserSchema)
    def patch(self, data, user_id):
        """Change role, active flag or names (admin). Deactivating ends all their tokens."""
        return service.update_user(user_id, data)


@blp.route("/users/<int:user_id>/reset-totp")
class UserResetTotp(MethodView):
    @requires("admin")
    @blp.response(200, UserSchema)
    @blp.doc(operationId="resetUserTotp")
    def post(self, user_id):
        """Turn a user's TOTP off, e.g. after a lost phone (admin)."""
        return service.reset_totp(user_id)
