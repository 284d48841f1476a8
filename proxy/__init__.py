"""The network half of xmpp-dane-proxy: listeners, XML streams, TLS, relay, CLI, operations.

Imports `policy` (the trust half); `policy` never imports this package.
"""
__version__ = "0.1.0"
