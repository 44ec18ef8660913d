"""Accounts (scenario 1): SMS codes, registration, login, logout, password reset, profile."""

from tornado.web import url

from demo.views import users_views as v

urls = [
    url(r"/users/code", v.CodeHandler, name="users.code"),
    url(r"/users/regist", v.RegistHandler, name="users.regist"),
    url(r"/users/login", v.LoginHandler, name="users.login"),
    url(r"/users/logout", v.LogoutHandler, name="users.logout"),
    url(r"/users/password/reset", v.PasswordResetHandler, name="users.password_reset"),
    url(r"/users/me", v.MeHandler, name="users.me"),
]
