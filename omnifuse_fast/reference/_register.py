"""Registers the reference path as the "reference" backend of every op."""

from omnifuse_fast import _dispatch, reference

for _name in reference.__all__:
    _dispatch.register(_name, "reference", getattr(reference, _name))
