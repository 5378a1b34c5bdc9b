"""The mergekit reference fixtures (tests/mergekit_ref.py) for the method tests."""

from tests.mergekit_ref import mergekit, mergekit_installed  # noqa: F401
