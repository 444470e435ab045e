"""Nothing but its presence: pytest's default (prepend) import mode puts the folder of a
conftest.py without an __init__.py on sys.path, so every test module under tests/ imports
the shared helpers in tests/localplay.py as `localplay`."""
