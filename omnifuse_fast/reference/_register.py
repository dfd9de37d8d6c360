"""Registers the reference path as the "reference" backend of every op of ``_dispatch.OPS``."""

from omnifuse_fast import _dispatch, reference

for _name in _dispatch.OPS:
    _dispatch.register(_name, "reference", getattr(reference, _name))
