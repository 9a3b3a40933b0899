"""
Content filters: what sees a message after its data and before the reply to
it (see L{relay.interfaces.IMessageFilter}).
"""
