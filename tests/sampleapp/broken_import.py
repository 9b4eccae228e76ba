"""A module whose own import fails, to test that the cause is reported."""

import this_dependency_is_not_installed  # noqa: F401
