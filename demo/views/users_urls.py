"""Accounts (scenario 1): SMS codes, registration, login, logout, password reset, profile."""
from demo.views import users_views as v

urls = [
    (r"/users/code", v.CodeHandler),
    (r"/users/regist", v.RegistHandler),
    (r"/users/login", v.LoginHandler),
    (r"/users/logout", v.LogoutHandler),
    (r"/users/password/reset", v.PasswordResetHandler),
    (r"/users/me", v.MeHandler),
]
