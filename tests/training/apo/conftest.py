"""The APO tests' fixtures, defined in ``apo_fixtures`` (a module of its own, so tests import its helpers by a
name no other conftest has)."""

from apo_fixtures import failing_transitions, optimizer, passing_transitions, policy, registry

__all__ = ["failing_transitions", "optimizer", "passing_transitions", "policy", "registry"]
