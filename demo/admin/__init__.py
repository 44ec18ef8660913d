"""The operator's commands, beside the server (``demo.main``): ``python -m demo.admin COMMAND`` or
``demo-admin COMMAND``. Each command is a module here with ``add_parser`` and ``run``; the work itself
lives in plain modules under ``demo/common``, so the commands only read arguments and settings and print.
"""
