"""Test support code: real peers over loopback, scripted upstreams, private mail servers.

Nothing here is a test; test modules import from here, never from one another.
"""
