import os

# Integration tests talk to servers on loopback only; a proxy from the environment must not intercept them.
os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")
