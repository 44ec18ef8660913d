"""Accounts (scenario 1): SMS codes, registration, login, logout, password reset, profile, the list of
sessions, password and phone changes, the export of one's data."""

from tornado.web import url

from demo.views import users_views as v

urls = [
    url(r"/users/code", v.CodeHandler, name="users.code"),
    url(r"/users/regist", v.RegistHandler, name="users.regist"),
    url(r"/users/login", v.LoginHandler, name="users.login"),
    url(r"/users/logout", v.LogoutHandler, name="users.logout"),
    url(r"/users/password/reset", v.PasswordResetHandler, name="users.password_reset"),
    url(r"/users/password", v.PasswordChangeHandler, name="users.password"),
    url(r"/users/phone", v.PhoneChangeHandler, name="users.phone"),
    url(r"/users/me", v.MeHandler, name="users.me"),
    url(r"/users/me/export", v.ExportHandler, name="users.export"),
    url(r"/users/me/sessions", v.SessionsHandler, name="users.sessions"),
    url(r"/users/me/sessions/([A-Za-z0-9_-]{1,64})", v.SessionHandler, name="users.session"),
]
