"""Locust plugin: ``ARENA_LOCUST_LOGIN=user:password`` alone puts the web UI behind a login.

Unset or empty: nothing changes. Set: Locust starts as if ``--web-login`` were given, and every
page and API call needs that user. Browsers get Locust's own login page; scripts, the
healthchecks and ``curl -u user:password`` send HTTP Basic credentials instead, and get a 401
(not a login page) without them. Only ``/metrics`` stays open, because Prometheus scrapes it.

Load it as a second locustfile (the image does: ``LOCUST_LOCUSTFILE=...locustfile.py,...``):

    ARENA_LOCUST_LOGIN=me:secret locust -f loadtest/plugin/locustfile.py,loadtest/plugin/weblogin.py

Locust 2.47 has no basic-auth flag any more (``--web-auth`` and ``LOCUST_WEB_AUTH`` now only
print an error); ``--web-login`` needs a locustfile to say who may log in: this file does.
"""

from __future__ import annotations

import hmac
import os
import secrets
import sys
from collections.abc import Mapping
from typing import Any

from locust import events

LOGIN_VARIABLE = "ARENA_LOCUST_LOGIN"
# Reachable without logging in: the login page, its form target and its assets, and the
# Prometheus endpoint (Prometheus scrapes without credentials).
OPEN_ENDPOINTS = frozenset({"locust.login", "locust.send_assets", "static", "arena_login.submit"})
OPEN_PATHS = frozenset({"/metrics"})


def configured_login(environ: Mapping[str, str] | None = None) -> tuple[str, str] | None:
    """(user, password) from ARENA_LOCUST_LOGIN; None when unset or empty; ValueError if bad."""
    value = (os.environ if environ is None else environ).get(LOGIN_VARIABLE, "")
    if not value:
        return None
    user, separator, password = value.partition(":")
    if not separator or not user or not password:
        raise ValueError(f"{LOGIN_VARIABLE} must be user:password, both non-empty")
    return user, password


def _matches(given: str | None, expected: str) -> bool:
    # Constant time, so the reply time does not tell how much of a guess was right.
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


@events.init_command_line_parser.add_listener
def _login_on_when_configured(parser: Any, **_kwargs: Any) -> None:
    # A default, not a forced value: the variable alone switches Locust's own --web-login on.
    try:
        if configured_login():
            parser.set_defaults(web_login=True)
    except ValueError:
        pass  # reported (and fatal) in _install_login, where Locust's other knobs are checked


@events.init.add_listener
def _install_login(environment: Any, web_ui: Any = None, **_kwargs: Any) -> None:
    try:
        login = configured_login()
    except ValueError as error:
        sys.stderr.write(f"locust: error: {error}\n")
        sys.exit(2)
    web_ui = web_ui or environment.web_ui
    if web_ui is None or not web_ui.web_login:
        return  # a worker, a headless run, or no login wanted
    if login is None:
        # --web-login without credentials would leave Locust's login page accepting no one, or
        # (without a user loader) answering errors; refuse to start instead.
        sys.stderr.write(f"locust: error: --web-login needs {LOGIN_VARIABLE}=user:password\n")
        sys.exit(2)
    protect(web_ui, *login)


def protect(web_ui: Any, user: str, password: str) -> None:
    """Require `user`/`password` (login form or HTTP Basic) for everything but /metrics."""
    from flask import Blueprint, redirect, request, session, url_for
    from flask_login import UserMixin, current_user, login_user

    class Operator(UserMixin):
        """The one account the web UI knows."""

        def get_id(self) -> str:
            return user

    app = web_ui.app
    # A fresh key per start: sessions end when Locust restarts, and no key is ever stored.
    app.config["SECRET_KEY"] = secrets.token_bytes(32)
    app.config["SESSION_COOKIE_HTTPONLY"] = True
    app.config["SESSION_COOKIE_SAMESITE"] = "Lax"
    manager = web_ui.login_manager

    @manager.user_loader
    def load_session_user(user_id: str) -> Operator | None:
        return Operator() if _matches(user_id, user) else None

    @manager.request_loader
    def load_basic_auth_user(_request: Any) -> Operator | None:
        credentials = request.authorization
        if credentials is None or credentials.type != "basic":
            return None
        if _matches(credentials.username, user) and _matches(credentials.password, password):
            return Operator()
        return None

    @manager.unauthorized_handler
    def refuse() -> Any:
        # A browser opening a page is sent to the login form; anything else (the UI's own
        # polling, curl, the healthchecks) gets a plain 401 it can act on.
        if request.accept_mimetypes.best_match(["application/json", "text/html"]) == "text/html":
            return redirect(url_for("locust.login"))
        return (
            "login required\n",
            401,
            {
                "WWW-Authenticate": 'Basic realm="Locust"',
                "Content-Type": "text/plain; charset=utf-8",
            },
        )

    base_path = (web_ui.environment.parsed_options.web_base_path or "").rstrip("/")
    blueprint = Blueprint("arena_login", __name__, url_prefix=base_path or None)

    @blueprint.route("/login_submit", methods=["POST"])
    def submit() -> Any:
        if _matches(request.form.get("username"), user) and _matches(
            request.form.get("password"), password
        ):
            login_user(Operator())
            return redirect(url_for("locust.index"))
        session["auth_error"] = "Wrong user name or password"
        return redirect(url_for("locust.login"))

    app.register_blueprint(blueprint)
    web_ui.auth_args = {"username_password_callback": f"{base_path}/login_submit"}

    def require_login() -> Any:
        # Runs before every other hook and view, so routes added by any plugin (including the
        # ones that do not use Locust's auth_required_if_enabled) are covered too.
        if request.endpoint in OPEN_ENDPOINTS or request.path in OPEN_PATHS:
            return None
        if request.method == "OPTIONS" or current_user.is_authenticated:
            return None
        return manager.unauthorized()

    app.before_request_funcs.setdefault(None, []).insert(0, require_login)
