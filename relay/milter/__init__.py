"""
The MTA side of the Sendmail milter protocol (version 6): the wire codec
(L{relay.milter.protocol}), one conversation with a milter over a Twisted
endpoint (L{relay.milter.client}), and the C{milter} content filter built on
them (L{relay.milter.filter}).
"""
