"""What the tests share: the database helper, the fake Cloud API, the TCP proxy, the command's
environment and runner, daemon subprocesses. Fixtures stay in conftest.py."""
