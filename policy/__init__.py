"""The trust half of xmpp-dane-proxy: DNS evidence, TLSA/DANE, PKIX names, policy files, verdicts.

Nothing in this package imports `proxy`; everything it decides can be tested without sockets.
"""
